"""Validation, command building and output parsing of the SSH control module (no network)."""

from __future__ import annotations

import shlex

import pytest
from hypothesis import given
from hypothesis import strategies as st

from retailcrm_service.settings import asterisk_from
from retailcrm_service.telephony.asterisk_ssh import (
    AsteriskSettings,
    ChannelNotFound,
    CommandFailed,
    CommandResult,
    InvalidArgument,
    _check_result,
    originate_command,
    parse_channels_concise,
    redirect_command,
    remote_command,
    validate_channel,
    validate_extension,
    validate_host,
    validate_phone,
)

GOOD_CHANNELS = [
    "SIP/150-0000a1b2",
    "PJSIP/151-00000001",
    "Local/150@ctx-0000001;1",
    "LOCAL/375291234567@inoffice-00000a2b;2",
    "SIP/sip-line-main-0000a1c0",
    "IAX2/trunk-1234",
]
HOSTILE_CHANNELS = [
    "SIP/150-0000a1b2; rm -rf /",
    "SIP/150 inoffice",
    'SIP/150"',
    "SIP/150'",
    "SIP/$(id)",
    "SIP/`id`",
    "SIP/150\n",
    "SIP/150,evil,1",
    "SIP/150|cat",
    "SIP/150&",
    "Console/dsp",
    "",
    "SIP/",
    "Local/150@ctx;3",
    "SIP/150-0000a1b2\x00",
]


@pytest.mark.parametrize("name", GOOD_CHANNELS)
def test_real_channel_names_are_accepted(name: str) -> None:
    assert validate_channel(name) == name


@pytest.mark.parametrize("name", HOSTILE_CHANNELS)
def test_hostile_channel_names_are_refused(name: str) -> None:
    with pytest.raises(InvalidArgument):
        validate_channel(name)


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("+375291234567", "+375291234567"),
        ("375447034448", "375447034448"),
        (" +375 (29) 123-45-67 ", "+375291234567"),
        ("150", "150"),
        (375291234567, "375291234567"),
    ],
)
def test_phone_numbers_are_normalised(raw: object, clean: str) -> None:
    assert validate_phone(raw) == clean


@pytest.mark.parametrize(
    "raw",
    ["<unknown>", "123;reboot", "+1 2$(id)", "1'2", "abc", "", "1", "++375", "1" * 21, None, True],
)
def test_hostile_or_bogus_phone_numbers_are_refused(raw: object) -> None:
    with pytest.raises(InvalidArgument):
        validate_phone(raw)


@pytest.mark.parametrize("ext", ["1", "123456", "15a", " 150", "150\n", ""])
def test_extensions_must_be_two_to_five_digits(ext: str) -> None:
    with pytest.raises(InvalidArgument):
        validate_extension(ext)


def test_hosts_are_ip_addresses_or_dns_names() -> None:
    assert validate_host(" 10.88.10.19 ") == "10.88.10.19"
    assert validate_host("pbx-1.example.net") == "pbx-1.example.net"
    for bad in ["-oProxyCommand=x", "host name", "a;b", "", "x" * 300]:
        with pytest.raises(InvalidArgument):
            validate_host(bad)


def test_redirect_and_originate_commands_are_exactly_the_documented_ones() -> None:
    assert (
        redirect_command("SIP/150-0000a1b2", "inoffice", "151", 1)
        == "channel redirect SIP/150-0000a1b2 inoffice,151,1"
    )
    assert (
        originate_command("150", "+375291234567")
        == "channel originate LOCAL/150@web-originate application Dial LOCAL/+375291234567@inoffice"
    )


def test_remote_command_is_a_single_quoted_argument() -> None:
    cli = "channel redirect SIP/150-0000a1b2 inoffice,151,1"
    assert remote_command(cli) == "asterisk -rx 'channel redirect SIP/150-0000a1b2 inoffice,151,1'"
    assert shlex.split(remote_command(cli)) == ["asterisk", "-rx", cli]


@given(st.text(max_size=40), st.text(max_size=20))
def test_any_input_either_fails_validation_or_reaches_asterisk_as_one_argument(
    channel: str, phone: str
) -> None:
    for build in (
        lambda: redirect_command(channel, "inoffice", "150"),
        lambda: originate_command("150", phone),
    ):
        try:
            cli = build()
        except InvalidArgument:
            continue
        assert shlex.split(remote_command(cli)) == ["asterisk", "-rx", cli]
        assert not set(cli) & set("'\"`$\\|&<>\n\r\t\x00")


def test_concise_channel_listing_is_parsed() -> None:
    text = (
        "SIP/150-0000a1b2!inoffice!150!1!Up!Dial!SIP/151,30!375291234567!!!3!42!br-1!1757840723.6\n"
        "Local/150@web-originate-00000001;1!web-originate!150!3!Ring!Dial!x!150!!!3!!!1757840800.9\n"
        "\n"
        "2 active channels\n"
    )
    channels = parse_channels_concise(text)
    assert [c.name for c in channels] == ["SIP/150-0000a1b2", "Local/150@web-originate-00000001;1"]
    assert channels[0].duration == 42
    assert channels[0].unique_id == "1757840723.6"
    assert channels[1].duration is None


def _result(stdout: str, exit_status: int = 0) -> CommandResult:
    return CommandResult("h", "c", exit_status, stdout, "", 0.0)


def test_asterisk_failures_are_recognised_despite_exit_status_zero() -> None:
    with pytest.raises(ChannelNotFound):
        _check_result(_result("Channel 'SIP/1-1' not found\n"))
    with pytest.raises(CommandFailed):
        _check_result(_result("No such command 'x'\n"))
    with pytest.raises(CommandFailed):
        _check_result(_result("Unable to connect to remote asterisk\n", exit_status=1))
    ok = _result("Channel 'SIP/1-1' successfully redirected to inoffice,150,1\n")
    assert _check_result(ok) is ok


def test_settings_refuse_unsafe_values_and_read_the_environment() -> None:
    with pytest.raises(ValueError, match="known_hosts"):
        AsteriskSettings(known_hosts="")
    with pytest.raises(ValueError, match="SSH user"):
        AsteriskSettings(user="root; id")
    with pytest.raises(ValueError, match="SSH port"):
        AsteriskSettings(port=0)
    settings = asterisk_from(
        {
            "RETAILCRM_SSH_USER": "pbx",
            "RETAILCRM_SSH_KEY": "/etc/vochi/id_ed25519",
            "RETAILCRM_SSH_KNOWN_HOSTS": "/etc/vochi/known_hosts",
            "RETAILCRM_SSH_PORT": "2222",
            "RETAILCRM_SSH_COMMAND_TIMEOUT": "4.5",
        }
    )
    assert (settings.user, settings.port, settings.command_timeout) == ("pbx", 2222, 4.5)
    assert settings.known_hosts == "/etc/vochi/known_hosts"
