"""benchmarks/peak_calls.py's arithmetic: what counts as late, lost and recovered, and how the
host simulator reads responses. The benchmark's figures are only as honest as these rules."""

from __future__ import annotations

import asyncio
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from _peak_calls.analysis import Calls, Receipts, measure, quantile, recovery
from _peak_calls.calls import templates
from _peak_calls.hosts import _Connection

MIX = templates()
MISSED = next(i for i, t in enumerate(MIX) if t.label == "missed")  # dial (popup), hangup


def missed_call(start: float, *, dial: int = 200, hangup: int = 200) -> list[list]:
    """The hooks of one missed call: the dial at ``start``, the hangup 2.5 s later."""
    return [[0, 0, start, 4.0, dial, 1], [0, 1, start + 2.5, 6.0, hangup, 1]]


def records(*hooks: list, uid: str = "1765000001.1") -> Calls:
    return Calls(calls=[[uid, 0, MISSED, 100.0]], hooks=list(hooks), templates=MIX)


def test_the_fixture_mix_expects_popups_and_history_only_where_the_product_sends_them() -> None:
    by_label = {t.label: t for t in MIX}
    assert by_label["escalation"].popups == [
        ("in", ("150", "151")),
        ("in", ("150", "151", "152")),
        ("hangup", ("150", "151", "152")),
    ]
    assert by_label["recovered"].popups == []
    assert by_label["recovered"].has_history
    for label in ("internal", "unknown", "crm_leg"):
        assert by_label[label].popups == []
        assert not by_label[label].has_history
    assert math.isclose(sum(t.share for t in MIX), 1.0)


def test_a_history_that_never_arrived_is_lost_and_infinitely_late() -> None:
    receipts = Receipts()
    receipts.add(
        {
            "popups": [["1765000001.1", "in", ["150"], 100.25]],
            "calls": [],
            "rate_limited": 0,
            "requests": {},
        }
    )
    figures = measure(records(*missed_call(100.0)), receipts)
    summary = figures.summary()
    assert figures.lost == ["1765000001.1"]
    assert summary["popups_expected"] == 2
    assert summary["popups_missing"] == 1  # the hangup's popup
    assert figures.popups == [(100.0, pytest.approx(0.25)), (102.5, math.inf)]
    assert math.isinf(summary["popup_p99_ms"])
    assert math.isinf(summary["history_p99_ms"])


def test_a_hangup_popup_is_owed_only_for_a_card_that_was_opened() -> None:
    """The product sends a call's hangup event only when a dial popup of it was shown."""
    figures = measure(records(*missed_call(100.0)), Receipts())  # the dial popup never came
    summary = figures.summary()
    assert (summary["popups_expected"], summary["popups_missing"]) == (1, 1)
    assert figures.popups == [(100.0, math.inf)]


def test_a_call_whose_hangup_the_host_never_got_acknowledged_is_not_counted_lost() -> None:
    figures = measure(records(*missed_call(100.0, hangup=-1)), Receipts())
    assert figures.lost == []
    assert figures.host_errors == 1
    assert math.isinf(figures.summary()["ack_p99_ms"])


def test_the_first_arrival_counts_and_a_duplicate_upload_does_not_move_it() -> None:
    receipts = Receipts()
    for ts in (102.75, 109.0):
        receipts.add(
            {"popups": [], "calls": [["1765000001.1", ts]], "rate_limited": 3, "requests": {}}
        )
    figures = measure(records(*missed_call(100.0)), receipts)
    assert figures.history == [(102.5, 0.25)]
    assert receipts.rate_limited == 3


def test_quantile_is_nearest_rank_and_nan_without_values() -> None:
    assert quantile([1.0, 2.0, 3.0, 4.0], 0.5) == 3.0
    assert quantile([float(v) for v in range(100)], 0.99) == 99.0
    assert math.isnan(quantile([], 0.99))


def timeline(latency_by_second: dict[int, float], *, fault_end: float = 100.0) -> Calls:
    """One missed call per second after ``fault_end``, each popup as late as given."""
    calls, hooks = [], []
    for n, (second, _) in enumerate(sorted(latency_by_second.items())):
        start = fault_end + second + 0.1
        calls.append([f"1765000001.{n}", 0, MISSED, start])
        hooks.append([n, 0, start, 4.0, 200, 1])
    return Calls(calls=calls, hooks=hooks, templates=MIX)


def test_recovery_is_the_end_of_the_last_bad_second_and_the_backlog_drained() -> None:
    latencies = {0: 8.0, 1: 3.0, 2: 0.2, 3: 0.2, 4: 0.2, 5: 0.2}
    calls = timeline(latencies)
    receipts = Receipts()
    receipts.add(
        {
            "popups": [
                [c[0], "in", ["150"], c[3] + latencies[int(c[3] - 100.0)]] for c in calls.calls
            ],
            "calls": [],
            "rate_limited": 0,
            "requests": {},
        }
    )
    figures = measure(calls, receipts)
    figures.history.append((98.0, 4.5))  # hung up during the fault, arrived 2.5 s after it
    found = recovery(figures, 100.0, popup_limit=1.0, ack_limit=0.05, until=106.0)
    assert found == {"normal_after_s": 2.0, "backlog_drained_s": 2.5, "recovery_s": 2.5}


def test_still_abnormal_at_the_end_of_the_observation_is_not_recovered() -> None:
    calls = timeline({0: 0.2, 1: 0.2, 2: 0.2})
    figures = measure(calls, Receipts())  # no popup ever arrived
    found = recovery(figures, 100.0, popup_limit=1.0, ack_limit=0.05, until=103.0)
    assert found["normal_after_s"] is None
    assert found["recovery_s"] is None


def test_failed_webhooks_make_a_second_abnormal_even_without_popups() -> None:
    calls = Calls(
        calls=[["1765000001.1", 0, MISSED, 100.5]],
        hooks=[[0, 0, 100.5, 3000.0, -1, 0]],
        templates=MIX,
    )
    found = recovery(
        measure(calls, Receipts()), 100.0, popup_limit=1.0, ack_limit=0.05, until=110.0
    )
    assert found["normal_after_s"] == 1.0


@pytest.mark.parametrize(
    ("chunks", "expected"),
    [
        ([b'HTTP/1.1 200 OK\r\ncontent-length: 19\r\n\r\n{"status":"queued"}'], 200),
        ([b"HTTP/1.1 403 Forbidden\r\nContent-Length: 2\r\n", b"\r\n{}"], 403),
        ([b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nconnection: close\r\n\r\nab", b"cd"], 200),
    ],
)
def test_the_simulator_reads_a_response_by_its_content_length(
    chunks: list[bytes], expected: int
) -> None:
    async def scenario() -> tuple[int, bytes, bool]:
        conn = _Connection()

        class Transport(asyncio.Transport):
            def write(self, data: bytes | bytearray | memoryview) -> None: ...

            def close(self) -> None: ...

        conn.connection_made(Transport())
        waiter = conn.request(b"POST / HTTP/1.1\r\n\r\n")
        for chunk in chunks:
            assert not waiter.done()
            conn.data_received(chunk)
        status, body = await waiter
        return status, body, conn.closed

    status, body, closed = asyncio.run(scenario())
    assert status == expected
    assert body in (b'{"status":"queued"}', b"{}", b"abcd")
    assert closed == (b"connection: close" in b"".join(chunks))


def test_cpu_per_call_sizes_the_system_without_the_stand_ins() -> None:
    """CPU ms per call, per process kind; ``ours_and_postgres`` is what a production box carries
    (the sandbox stands in for RetailCRM's cloud and the hosts for Asterisk)."""
    from peak_calls import cpu_ms_per_call

    step = {
        "cpu_pct": {"call-service": 30.0, "postgres": 20.0, "sandbox": 15.0, "service": 50.0},
        "host_cpu_pct": 8.0,
    }
    assert cpu_ms_per_call(step, 100.0) == {
        "call-service": 3.0,
        "hosts": 0.8,
        "postgres": 2.0,
        "sandbox": 1.5,
        "service": 5.0,
        "ours_and_postgres": 10.0,
    }
    assert cpu_ms_per_call(step, 200.0)["ours_and_postgres"] == 5.0
