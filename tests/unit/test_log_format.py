"""The one log format: key=value lines that split cleanly (or JSON), uvicorn's lines included,
request ids, and secrets masked whoever logs them."""

from __future__ import annotations

import io
import json
import logging
import shlex
from collections.abc import Iterator

import pytest

from retailcrm_service.ops import logs


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    handler = logs.configure("DEBUG", "text", stream=stream)
    try:
        yield stream
    finally:
        logging.getLogger().removeHandler(handler)


def _pairs(line: str) -> dict[str, str]:
    return dict(token.split("=", 1) for token in shlex.split(line))


def test_a_value_with_spaces_or_quotes_is_quoted_so_the_line_still_splits(
    captured: io.StringIO,
) -> None:
    logging.getLogger("retailcrm_service.t").info(
        "delivery.failed enterprise=%s error=%s n=%d", "0367", 'a "b" c=d', 3
    )
    fields = _pairs(captured.getvalue().strip())
    assert fields["event"] == "delivery.failed"
    assert fields["enterprise"] == "0367"
    assert fields["error"] == 'a "b" c=d'
    assert fields["n"] == "3"
    assert fields["level"] == "info"


def test_uvicorn_and_free_text_lines_share_the_format_as_one_quoted_msg(
    captured: io.StringIO,
) -> None:
    uvicorn_error = logging.getLogger("uvicorn.error")
    # Other tests run uvicorn in-process, whose default config gives this logger its own
    # handler and stops propagation; serve() passes log_config=None so it keeps neither.
    uvicorn_error.handlers.clear()
    uvicorn_error.propagate = True
    uvicorn_error.setLevel(logging.NOTSET)
    uvicorn_error.info("Started server process [%d]", 42)
    fields = _pairs(captured.getvalue().strip())
    assert fields["logger"] == "uvicorn.error"
    assert fields["msg"] == "Started server process [42]"


def test_json_lines_carry_the_fields_and_the_request_id() -> None:
    stream = io.StringIO()
    handler = logs.configure("INFO", "json", stream=stream)
    token = logs.REQUEST_ID.set("req-1")
    try:
        logging.getLogger("retailcrm_service.t").info("events.committed accepted=%d", 5)
    finally:
        logs.REQUEST_ID.reset(token)
        logging.getLogger().removeHandler(handler)
    line = json.loads(stream.getvalue())
    assert line["event"] == "events.committed"
    assert line["accepted"] == "5"
    assert line["request_id"] == "req-1"


def test_dsn_passwords_and_registered_secrets_never_reach_a_line(captured: io.StringIO) -> None:
    secret = "jwt-0123456789abcdef-0123456789"
    logs.register_secret(secret)
    log = logging.getLogger("retailcrm_service.t")
    log.warning("db.failed dsn=%s", "postgresql://vochi:pa55word@db:5432/vochi")
    log.warning("oops token=%s", secret)
    try:
        raise RuntimeError(f"bad {secret}")
    except RuntimeError:
        log.exception("boom.failed")
    text = captured.getvalue()
    assert "pa55word" not in text
    assert secret not in text
    assert "postgresql://vochi:***@db:5432/vochi" in text


def test_only_sane_request_ids_are_taken_from_callers() -> None:
    assert logs.valid_request_id("abc-123") == "abc-123"
    assert logs.valid_request_id("a,b,c") == "a,b,c"
    assert logs.valid_request_id("a b") is None
    assert logs.valid_request_id("x\nlevel=error") is None
    assert logs.valid_request_id("x" * 129) is None
