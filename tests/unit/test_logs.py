"""The integration_logs writer: masking, truncation, batching, bounded queue, retries, retention."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence

import asyncpg
import pytest

from retailcrm_service.security.secrets import Secret
from retailcrm_service.storage.journal import (
    IntegrationLogWriter,
    LogRow,
    encode_payload,
    mask_payload,
)

pytestmark = pytest.mark.anyio

KEY = "Xk2PqL9vT4mZ8sW1cR7yB3nD6fH0jG5a"


class MemorySink:
    def __init__(self, failures: int = 0) -> None:
        self.batches: list[list[LogRow]] = []
        self.failures = failures

    async def __call__(self, rows: Sequence[LogRow]) -> None:
        if self.failures:
            self.failures -= 1
            raise asyncpg.PostgresConnectionError("down")
        self.batches.append(list(rows))

    @property
    def rows(self) -> list[LogRow]:
        return [r for b in self.batches for r in b]


async def no_sleep(_: float) -> None:
    await asyncio.sleep(0)


def test_secret_keys_are_masked_at_any_depth() -> None:
    data = {
        "api_key": KEY,
        "headers": {"X-API-KEY": KEY, "Accept": "json"},
        "integrationModule": {
            "clientId": "c" * 40,
            "accountUrl": "https://h/login?token=eyJabc.def",
        },
        "list": [{"password": "hunter2"}, Secret(KEY)],
        "count": 3,
    }
    masked = mask_payload(data)
    text = json.dumps(masked)
    assert KEY not in text
    assert "c" * 40 not in text
    assert "hunter2" not in text
    assert "eyJabc" not in text
    assert masked["headers"]["Accept"] == "json"
    assert masked["count"] == 3
    assert masked["api_key"] == "***" + KEY[-4:]


def test_remembered_keys_mask_as_the_first_time_and_stay_bounded() -> None:
    """Keys are remembered between payloads (a speed-up): the second payload is masked the same,
    odd keys still work, and a flood of distinct keys does not grow the memory without bound."""
    from retailcrm_service.storage import journal

    data = {"token": "t" * 30, "phone": "+79161234567", 7: "seven", "bad\x00key": "\ud800"}
    first = mask_payload(data)
    assert mask_payload(data) == first
    assert first["token"] == "***tttt"
    assert first["7"] == "seven"
    assert first["bad\ufffdkey"] == "?"
    json.dumps(first).encode("utf-8")  # storable
    mask_payload({f"k{i}": i for i in range(2 * journal._KEYS_MAX)})
    assert len(journal._KEYS) <= journal._KEYS_MAX
    assert mask_payload({"Authorization": "Bearer abc"})["Authorization"] != "Bearer abc"


def test_redact_scrubs_known_secrets_inside_free_text() -> None:
    masked = mask_payload({"message": f"bad key {KEY} given"}, redact=[KEY])
    assert KEY not in json.dumps(masked)


def test_large_payloads_are_truncated_to_a_preview() -> None:
    text = encode_payload({"blob": "x" * 50_000}, limit=1000)
    assert text is not None
    assert len(text) <= 1000
    decoded = json.loads(text)
    assert decoded["_truncated"] is True
    assert decoded["_original_chars"] > 50_000
    assert encode_payload(None) is None


async def test_rows_are_stored_in_batches_and_flushed_on_close() -> None:
    sink = MemorySink()
    async with IntegrationLogWriter(sink=sink, batch_size=10) as writer:
        for i in range(25):
            writer.write(
                "0367",
                "call_event",
                request_data={"i": i, "api_key": KEY},
                response_data={"success": True},
                status="success",
                call_unique_id=f"1.{i}",
            )
    assert [r.call_unique_id for r in sink.rows] == [f"1.{i}" for i in range(25)]
    assert all(len(b) <= 10 for b in sink.batches)
    assert all(KEY not in (r.request_data or "") for r in sink.rows)
    assert sink.rows[0].integration_type == "retailcrm"


async def test_rows_written_within_the_linger_share_one_insert() -> None:
    sink = MemorySink()
    async with IntegrationLogWriter(sink=sink, linger=0.3) as writer:
        for i in range(5):
            writer.write("0367", "call_event", request_data={"i": i}, response_data={}, status="ok")
            await asyncio.sleep(0.01)
        await writer.flush()
        assert [len(b) for b in sink.batches] == [5]


async def test_closing_the_writer_stores_lingering_rows_at_once() -> None:
    sink = MemorySink()
    writer = IntegrationLogWriter(sink=sink, linger=10.0, close_timeout=60.0)
    async with writer:
        writer.write("0367", "call_event", request_data={}, response_data={}, status="ok")
        await asyncio.sleep(0.05)  # the writer now lingers for the next rows
    assert len(sink.rows) == 1
    assert writer.stats()["lost"] == 0


def test_linger_out_of_range_is_refused() -> None:
    with pytest.raises(ValueError, match="linger"):
        IntegrationLogWriter(sink=MemorySink(), linger=-1)


async def test_write_never_blocks_and_counts_drops_when_full() -> None:
    sink = MemorySink()
    writer = IntegrationLogWriter(sink=sink, max_queue=3)
    results = [
        writer.write("0367", "e", request_data=None, response_data=None, status="error")
        for _ in range(5)
    ]
    assert results == [True, True, True, False, False]
    assert writer.stats()["dropped"] == 2
    async with writer:
        await writer.flush()
    assert len(sink.rows) == 3


async def test_a_failing_sink_is_retried_then_rows_are_stored() -> None:
    sink = MemorySink(failures=2)
    async with IntegrationLogWriter(sink=sink, sleep=no_sleep) as writer:
        writer.write("0367", "e", request_data={}, response_data={}, status="success")
        await writer.flush()
        assert writer.stats()["failed_batches"] == 2
    assert len(sink.rows) == 1


async def test_status_is_normalised_and_error_messages_are_scrubbed() -> None:
    sink = MemorySink()
    async with IntegrationLogWriter(sink=sink) as writer:
        writer.write(
            "0367",
            "e",
            request_data={},
            response_data={},
            status="weird",
            error_message=f"denied for {KEY}",
            redact=[Secret(KEY)],
        )
    assert sink.rows[0].status == "error"
    assert KEY not in (sink.rows[0].error_message or "")


async def test_retention_purge_runs_with_the_configured_days() -> None:
    calls: list[int] = []
    purged = asyncio.Event()

    async def purge(days: int) -> int:
        calls.append(days)
        purged.set()
        return 4

    async with IntegrationLogWriter(
        sink=MemorySink(), purge=purge, retention_days=7, sleep=no_sleep
    ) as writer:
        await purged.wait()
    assert calls[0] == 7
    assert writer.stats()["purged"] >= 4
