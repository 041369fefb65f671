"""Pure mapping of stored call events to RetailCRM telephony entities.

The rules are in docs/asterisk.md#event-mapping.

One incoming event becomes rows of one or more *kinds* (see ``kinds_for``): a ``popup`` row is
sent as ``telephony/call/event``, a ``history`` row as one call of ``telephony/calls/upload``,
and a ``note`` row (bridge) is only kept to attribute the call to whoever answered.

Choices where the platform leaves room (tests pin each one):

- ``CallStatus`` -> ``hangupStatus`` / upload ``result``: ``"2"`` and ``"5"`` (talk in progress)
  -> ``answered`` / ``answered``; ``"0"`` (no answer, busy, cancel, ... undistinguished) ->
  ``no answered`` / ``no answer``; ``"1"`` and anything else -> ``cancel`` (the card just closes)
  / ``unknown``. ``missed`` is never produced.
- ``duration`` is talk time: EndTime - StartTime (StartTime ``""`` falls back to DateReceived) for
  answered calls, ``0`` otherwise; ``durationWaiting`` is StartTime - DateReceived when answered
  and EndTime - DateReceived otherwise. Both are clamped at zero.
- ``date`` is the call start: DateReceived (falling back to StartTime, then EndTime), converted from
  the enterprise's timezone (default ``Europe/Minsk``) to the account's (default: the same).
- Phones: digits with a leading ``+`` for external numbers (8+ digits), bare digits for
  extensions; ``<unknown>`` and empty phones become ``""``. A popup without a phone or without any
  extension to notify is not sent (nobody could act on it). A call without the customer's number
  is not uploaded either: RetailCRM requires ``phone`` and a made-up one would create a junk
  customer; the row ends as ``skipped`` with the reason, visible in the outbox.
- ``codes`` hold only extensions (2-5 digits): ring groups can list mobile numbers, and the host
  can lose the list (``[""]``).
- Attribution: the answering extension from the bridge (ConnectedLineNum, CallerIDNum, Exten,
  then the channel name, whichever is an extension), else the only extension of the hangup;
  ``userId`` from ``user_extensions`` ({"<user id>": "<extension>"}).
- Internal calls (CallType 2) are skipped unless the enterprise sets ``internal_calls: true``;
  CRM-originated internal legs (``ExternalInitiated``) are always skipped. Recovered hangups
  (``origin: download``) only ever produce history.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

DEFAULT_TIMEZONE = "Europe/Minsk"
HOST_TIME_FORMAT = "%Y-%m-%d %H:%M:%S"

KIND_POPUP = "popup"
KIND_HISTORY = "history"
KIND_NOTE = "note"

CALL_INCOMING = 0
CALL_OUTGOING = 1
CALL_INTERNAL = 2

HANGUP_STATUSES = frozenset({"answered", "busy", "cancel", "failed", "no answered"})
UPLOAD_RESULTS = frozenset({"answered", "busy", "failed", "no answer", "not allowed", "unknown"})

_EXTENSION = re.compile(r"^\d{2,5}$")
_CHANNEL_EXTENSION = re.compile(r"^[A-Za-z0-9]+/(\d{2,5})-")
_ANSWERED = frozenset({"2", "5"})
_NO_ANSWER = frozenset({"0"})


@dataclass(frozen=True, slots=True)
class Skip:
    """Nothing is sent for this row, and why."""

    reason: str


@dataclass(frozen=True, slots=True)
class MappingConfig:
    """The per-enterprise knobs the mapping reads from ``integrations_config.retailcrm``."""

    timezone: str = DEFAULT_TIMEZONE
    account_timezone: str | None = None
    user_extensions: Mapping[str, str | None] = field(default_factory=dict)
    internal_calls: bool = False
    site: str | None = None

    def __post_init__(self) -> None:
        for name in (self.timezone, self.account_timezone):
            if name is not None:
                _zone(name)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> MappingConfig:
        """Build from an enterprise's ``retailcrm`` config, ignoring malformed optional keys."""
        extensions = config.get("user_extensions")
        site = config.get("site")
        return cls(
            timezone=valid_timezone(config.get("timezone")) or DEFAULT_TIMEZONE,
            account_timezone=valid_timezone(config.get("account_timezone")),
            user_extensions=dict(extensions) if isinstance(extensions, Mapping) else {},
            internal_calls=config.get("internal_calls") is True,
            site=site if isinstance(site, str) and site else None,
        )


def kinds_for(event_type: str, origin: str) -> tuple[str, ...]:
    """The outbox rows one event becomes, in delivery order."""
    if event_type == "dial":
        return () if origin == "download" else (KIND_POPUP,)
    if event_type == "bridge":
        return (KIND_NOTE,)
    if event_type == "hangup":
        return (KIND_HISTORY,) if origin == "download" else (KIND_POPUP, KIND_HISTORY)
    if event_type == "download":
        return (KIND_HISTORY,)
    return ()


def call_type(payload: Mapping[str, Any]) -> int | None:
    """``CallType`` as an int; the host sometimes sends it as a string."""
    raw = payload.get("CallType")
    if isinstance(raw, bool):
        return None
    if isinstance(raw, int):
        return raw
    # isascii too: isdigit admits '²', which int() refuses (a poison row in delivery).
    if isinstance(raw, str) and raw.strip().isascii() and raw.strip().isdigit():
        return int(raw.strip())
    return None


def normalize_phone(raw: Any) -> str:
    """``+digits`` for external numbers, bare digits for extensions, ``""`` when unknown."""
    if not isinstance(raw, str | int) or isinstance(raw, bool):
        return ""
    digits = re.sub(r"\D", "", str(raw))
    if not digits:
        return ""
    return "+" + digits if len(digits) >= 8 else digits


def extensions(raw: Any) -> list[str]:
    """The 2-5 digit extensions of a host ``Extensions`` list, in order, without duplicates."""
    if not isinstance(raw, list):
        return []
    found: list[str] = []
    for item in raw:
        value = str(item).strip() if isinstance(item, str | int) else ""
        if _EXTENSION.match(value) and value not in found:
            found.append(value)
    return found


def popup_event(
    event_type: str, payload: Mapping[str, Any], config: MappingConfig
) -> dict[str, Any] | Skip:
    """The ``telephony/call/event`` entity of a live dial or hangup."""
    skip = _forwarding_skip(payload, config)
    if skip is not None:
        return skip
    kind = call_type(payload)
    phone = normalize_phone(payload.get("Phone"))
    codes = extensions(payload.get("Extensions"))
    if not phone:
        return Skip("no customer phone")
    if not codes:
        return Skip("no extension to notify")
    event: dict[str, Any] = {"phone": phone, "codes": codes}
    if event_type == "dial":
        event["type"] = "out" if kind == CALL_OUTGOING else "in"
    elif event_type == "hangup":
        event["type"] = "hangup"
        event["hangupStatus"] = hangup_status(payload.get("CallStatus"))
    else:
        return Skip(f"no popup for {event_type}")
    unique_id = payload.get("UniqueId")
    if isinstance(unique_id, str) and unique_id:
        event["callExternalId"] = unique_id
    if config.site:
        event["site"] = config.site
    return event


def history_call(
    payload: Mapping[str, Any],
    config: MappingConfig,
    bridges: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any] | Skip:
    """The ``telephony/calls/upload`` call of a hangup (live or recovered)."""
    skip = _forwarding_skip(payload, config)
    if skip is not None:
        return skip
    unique_id = payload.get("UniqueId")
    if not isinstance(unique_id, str) or not unique_id:
        return Skip("no UniqueId")
    received = _host_time(payload.get("DateReceived"))
    started = _host_time(payload.get("StartTime"))
    ended = _host_time(payload.get("EndTime"))
    call_start = received or started or ended
    if call_start is None:
        return Skip("no call time")
    phone = normalize_phone(payload.get("Phone"))
    if not phone:
        return Skip("no customer phone")
    status = payload.get("CallStatus")
    answered = isinstance(status, str) and status.strip() in _ANSWERED
    talk_from = started or received or call_start
    wait_from = received or started or call_start
    if answered:
        duration = _seconds(talk_from, ended)
        waiting = _seconds(wait_from, started) if started else 0
    else:
        duration = 0
        waiting = _seconds(wait_from, ended)
    call: dict[str, Any] = {
        "date": _to_account_time(call_start, config),
        "type": "out" if call_type(payload) == CALL_OUTGOING else "in",
        "phone": phone,
        "result": upload_result(status),
        "duration": duration,
        "durationWaiting": waiting,
        "externalId": unique_id,
    }
    code = attributed_extension(payload, bridges)
    if code is not None:
        call["code"] = code
        user_id = user_for_extension(code, config.user_extensions)
        if user_id is not None:
            call["userId"] = user_id
    record_url = payload.get("record_url")
    if isinstance(record_url, str) and record_url.startswith(("http://", "https://")):
        call["recordUrl"] = record_url
    if config.site:
        call["site"] = config.site
    return call


def hangup_status(raw: Any) -> str:
    """``hangupStatus`` of ``call/event`` (vocabulary ``no answered``, never ``missed``)."""
    status = raw.strip() if isinstance(raw, str) else str(raw)
    if status in _ANSWERED:
        return "answered"
    if status in _NO_ANSWER:
        return "no answered"
    return "cancel"


def upload_result(raw: Any) -> str:
    """``result`` of ``calls/upload`` (vocabulary ``no answer``, never ``missed``)."""
    status = raw.strip() if isinstance(raw, str) else str(raw)
    if status in _ANSWERED:
        return "answered"
    if status in _NO_ANSWER:
        return "no answer"
    return "unknown"


def attributed_extension(
    payload: Mapping[str, Any], bridges: Sequence[Mapping[str, Any]] = ()
) -> str | None:
    """Who handled the call: the latest bridge's extension, else the hangup's only extension."""
    for bridge in reversed(bridges):
        found = bridge_extension(bridge)
        if found is not None:
            return found
    listed = extensions(payload.get("Extensions"))
    if len(listed) == 1 or (listed and call_type(payload) == CALL_OUTGOING):
        return listed[0]
    return None


def bridge_extension(bridge: Mapping[str, Any]) -> str | None:
    """The manager's extension on a bridge event, whichever field carries it."""
    for key in ("ConnectedLineNum", "CallerIDNum", "Exten"):
        value = bridge.get(key)
        if isinstance(value, str) and _EXTENSION.match(value.strip()):
            return value.strip()
    channel = bridge.get("Channel")
    if isinstance(channel, str):
        match = _CHANNEL_EXTENSION.match(channel)
        if match:
            return match.group(1)
    return None


def user_for_extension(code: str, user_extensions: Mapping[str, str | None]) -> int | None:
    """The RetailCRM user id whose extension is ``code`` (lowest id wins on a clash)."""
    owners = sorted(
        int(user_id)
        for user_id, extension in user_extensions.items()
        if extension is not None
        and str(extension).strip() == code
        and str(user_id).isascii()
        and str(user_id).isdigit()
    )
    return owners[0] if owners else None


def upload_batches(calls: Iterable[dict[str, Any]], size: int = 50) -> list[list[dict[str, Any]]]:
    """Split calls into ``calls/upload`` requests of at most ``size`` calls."""
    batch: list[dict[str, Any]] = []
    batches: list[list[dict[str, Any]]] = []
    for call in calls:
        batch.append(call)
        if len(batch) == size:
            batches.append(batch)
            batch = []
    if batch:
        batches.append(batch)
    return batches


def _forwarding_skip(payload: Mapping[str, Any], config: MappingConfig) -> Skip | None:
    if call_type(payload) != CALL_INTERNAL:
        return None
    if payload.get("ExternalInitiated") is True:
        return Skip("CRM-originated internal leg")
    if not config.internal_calls:
        return Skip("internal call")
    return None


def _host_time(raw: Any) -> datetime | None:
    if not isinstance(raw, str) or not raw.strip():
        return None
    try:
        return datetime.strptime(raw.strip(), HOST_TIME_FORMAT)
    except ValueError:
        return None


def _seconds(start: datetime | None, end: datetime | None) -> int:
    if start is None or end is None:
        return 0
    return max(0, int((end - start).total_seconds()))


def _to_account_time(local: datetime, config: MappingConfig) -> str:
    if config.account_timezone is None or config.account_timezone == config.timezone:
        return local.strftime(HOST_TIME_FORMAT)
    aware = local.replace(tzinfo=_zone(config.timezone))
    return aware.astimezone(_zone(config.account_timezone)).strftime(HOST_TIME_FORMAT)


def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"unknown timezone {name!r}") from exc


def valid_timezone(raw: Any) -> str | None:
    """``raw`` when it names a known timezone, else None."""
    if not isinstance(raw, str) or not raw:
        return None
    try:
        _zone(raw)
    except ValueError:
        return None
    return raw
