"""Our dialplan replies survive the Asterisk macro's cutting (docs/asterisk.md#dialplan-reply)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from retailcrm_service.telephony.smart_redirect import dialplan_context, dialplan_reply


def macro_cut(reply: str) -> tuple[str, str]:
    """What ``macro-getcustomerdata`` makes of a reply: (CALLNAME, NEXT).

    A reply shorter than 30 characters means no redirect. Otherwise the text is cut on commas
    into fields, and each field on double quotes: the 4th piece of the 1st field is the name,
    the 4th piece of the 2nd field the context to ``Goto``.
    """
    if len(reply) < 30:
        return "", ""
    fields = reply.split(",")

    def piece(index: int) -> str:
        if index >= len(fields):
            return ""
        parts = fields[index].split('"')
        return parts[3] if len(parts) > 3 else ""

    return piece(0), piece(1)


def test_a_redirect_reply_gives_the_context() -> None:
    reply = dialplan_reply("Petrov Ivan", "mngr31_0001363_1").decode()
    assert reply == '{"Name":"Petrov Ivan","DialPlan":"mngr31_0001363_1"}'
    assert macro_cut(reply) == ("Petrov Ivan", "mngr31_0001363_1")


def test_the_no_redirect_reply_is_short_and_has_no_context() -> None:
    reply = dialplan_reply("", None).decode()
    assert reply == '{"Name":"","DialPlan":null}'
    assert len(reply) < 30
    assert macro_cut(reply) == ("", "")


def test_a_name_with_commas_and_quotes_does_not_shift_the_context() -> None:
    reply = dialplan_reply('Petrov, "Ivan" Jr., LLC "Roga"', "mngr31_0001363_1").decode()
    name, context = macro_cut(reply)
    assert context == "mngr31_0001363_1"
    assert name == "Petrov Ivan Jr. LLC Roga"


def test_a_named_caller_without_redirect_gives_no_context() -> None:
    name, context = macro_cut(dialplan_reply("Очень длинное имя клиента", None).decode())
    assert (name, context) == ("Очень длинное имя клиента", "")


@given(
    st.text(max_size=80),
    st.integers(min_value=1, max_value=10**6),
    st.from_regex(r"[A-Za-z0-9_-]{1,20}", fullmatch=True),
)
def test_any_name_leaves_the_context_intact(name: str, phone_id: int, trunk: str) -> None:
    context = dialplan_context(phone_id, trunk)
    assert context is not None
    reply = dialplan_reply(name, context).decode()
    assert reply.startswith('{"Name":"')
    assert macro_cut(reply)[1] == context
