"""The per-target buffer: overflow order, expiry, supersession, fairness, conservation of events."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from vochi_crm_client._buffer import TargetBuffer
from vochi_crm_client._event import CallEvent


def ev(kind: str, uid: str, ent: str = "0367") -> CallEvent:
    payload: dict[str, Any] = {"Extensions": ["150"]} if kind == "dial" else {}
    return CallEvent(enterprise_number=ent, event_type=kind, call_unique_id=uid, payload=payload)  # type: ignore[arg-type]


def kinds(entries: list[Any]) -> list[str]:
    return [f"{e.event.event_type}:{e.event.call_unique_id}" for e in entries]


def test_at_the_bound_popups_go_first_then_the_oldest_history() -> None:
    buf = TargetBuffer(max_queue=4, popup_ttl=30)
    buf.put(ev("hangup", "h1"), 0)
    buf.put(ev("dial", "d1"), 0)
    buf.put(ev("hangup", "h2"), 0)
    buf.put(ev("dial", "d2"), 0)
    buf.put(ev("hangup", "h3"), 0)  # evicts d1 (the oldest popup)
    buf.put(ev("hangup", "h4"), 0)  # evicts d2
    buf.put(ev("hangup", "h5"), 0)  # no popups left: evicts h1, the oldest history
    assert buf.counters.dropped["overflow"] == 3
    assert kinds(buf.take(0, 10, 1 << 20)) == ["hangup:h2", "hangup:h3", "hangup:h4", "hangup:h5"]


def test_an_incoming_popup_is_dropped_when_only_history_is_queued() -> None:
    buf = TargetBuffer(max_queue=2, popup_ttl=30)
    buf.put(ev("hangup", "h1"), 0)
    buf.put(ev("hangup", "h2"), 0)
    buf.put(ev("dial", "d1"), 0)
    assert kinds(buf.take(0, 10, 1 << 20)) == ["hangup:h1", "hangup:h2"]
    assert buf.counters.dropped["overflow"] == 1


def test_overflow_takes_history_from_the_biggest_enterprise() -> None:
    buf = TargetBuffer(max_queue=4, popup_ttl=30)
    buf.put(ev("hangup", "b1", ent="0002"), 0)
    for i in range(3):
        buf.put(ev("hangup", f"a{i}", ent="0001"), 0)
    buf.put(ev("hangup", "a3", ent="0001"), 0)
    assert buf.queued_by_enterprise() == {"0001": 3, "0002": 1}


def test_a_flood_at_the_bound_evicts_the_flooders_own_history() -> None:
    buf = TargetBuffer(max_queue=100, popup_ttl=30)
    for i in range(10):
        buf.put(ev("hangup", f"b{i}", ent="0002"), 0)
    for i in range(1000):
        buf.put(ev("hangup", f"a{i}", ent="0001"), 0)
    assert buf.queued_by_enterprise() == {"0001": 90, "0002": 10}
    kept = {e.event.call_unique_id for e in buf.take(0, 200, 1 << 20)}
    assert {f"a{i}" for i in range(910, 1000)} <= kept
    assert buf.counters.dropped["overflow"] == 910


def test_popups_expire_after_the_ttl_and_history_does_not() -> None:
    buf = TargetBuffer(max_queue=100, popup_ttl=30)
    buf.put(ev("dial", "1"), 0)
    buf.put(ev("bridge", "1"), 1)
    buf.put(ev("hangup", "2"), 1)
    buf.expire(30.5)
    assert buf.counters.dropped["expired"] == 1
    assert kinds(buf.take(31.0, 10, 1 << 20)) == ["hangup:2"]
    assert buf.counters.dropped["expired"] == 2


def test_a_queued_hangup_supersedes_only_its_own_calls_popups_while_degraded() -> None:
    buf = TargetBuffer(max_queue=100, popup_ttl=30)
    buf.degraded = True
    buf.put(ev("dial", "1"), 0)
    buf.put(ev("bridge", "1"), 0)
    buf.put(ev("dial", "2"), 0)
    buf.put(ev("dial", "1", ent="0999"), 0)  # same UniqueId, another enterprise
    buf.put(ev("hangup", "1"), 0)
    assert buf.counters.dropped["superseded"] == 2
    assert sorted(kinds(buf.take(0, 10, 1 << 20))) == ["dial:1", "dial:2", "hangup:1"]


def test_on_a_healthy_target_only_late_popups_are_superseded() -> None:
    buf = TargetBuffer(max_queue=100, popup_ttl=30, supersede_after=1.0)
    buf.put(ev("dial", "old"), 0)
    buf.put(ev("dial", "new"), 9.5)
    buf.put(ev("hangup", "old"), 10)  # its dial waited 10 s: late
    buf.put(ev("hangup", "new"), 10)  # its dial waited 0.5 s: still sent (a very short call)
    assert buf.counters.dropped["superseded"] == 1
    assert kinds(buf.take(10, 10, 1 << 20)) == ["dial:new", "hangup:old", "hangup:new"]


def test_a_popup_that_failed_an_attempt_is_superseded_at_once() -> None:
    buf = TargetBuffer(max_queue=100, popup_ttl=30)
    buf.put(ev("dial", "1"), 0)
    buf.requeue(buf.take(0, 10, 1 << 20))
    buf.put(ev("hangup", "1"), 0.1)
    assert kinds(buf.take(0.1, 10, 1 << 20)) == ["hangup:1"]
    assert buf.counters.dropped["superseded"] == 1


def test_batches_are_cut_round_robin_across_enterprises() -> None:
    buf = TargetBuffer(max_queue=10_000, popup_ttl=30)
    for i in range(1000):
        buf.put(ev("hangup", f"a{i}", ent="0001"), 0)
    buf.put(ev("hangup", "b", ent="0002"), 0)
    batch = buf.take(0, 100, 1 << 20)
    assert len(batch) == 100
    assert "hangup:b" in kinds(batch)


def test_requeued_events_go_back_to_the_front_in_order() -> None:
    buf = TargetBuffer(max_queue=100, popup_ttl=30)
    for i in range(5):
        buf.put(ev("hangup", str(i)), 0)
    batch = buf.take(0, 3, 1 << 20)
    buf.requeue(batch)
    assert kinds(buf.take(0, 10, 1 << 20)) == [f"hangup:{i}" for i in range(5)]
    assert buf.counters.requeued == 3


def test_superseded_entries_are_compacted_away_and_the_call_index_is_freed() -> None:
    buf = TargetBuffer(max_queue=100_000, popup_ttl=30)
    buf.degraded = True
    for i in range(10_000):
        buf.put(ev("dial", str(i)), 0)
        buf.put(ev("hangup", str(i)), 0)
    assert buf.queued == 10_000
    assert buf._calls == {}
    assert len(buf._queues["0367"].fifo) < 2 * 10_000 + 100


@settings(max_examples=200, deadline=None, derandomize=True)
@given(
    ops=st.lists(
        st.one_of(
            st.tuples(
                st.just("put"),
                st.sampled_from(["dial", "bridge", "hangup", "download"]),
                st.integers(0, 5),
                st.sampled_from(["0001", "0002", "0003"]),
            ),
            st.tuples(st.just("take"), st.integers(1, 6)),
            st.tuples(st.just("settle")),
            st.tuples(st.just("requeue")),
            st.tuples(st.just("tick"), st.sampled_from([0.1, 1.0, 10.0, 31.0])),
            st.tuples(st.just("degrade"), st.booleans()),
        ),
        max_size=60,
    )
)
def test_every_event_is_accounted_for(ops: list[tuple[Any, ...]]) -> None:
    """enqueued == settled + dropped + queued + held, and the bound always holds."""
    buf = TargetBuffer(max_queue=8, popup_ttl=30)
    now = 0.0
    held: list[Any] = []
    settled = 0
    for op in ops:
        if op[0] == "put":
            buf.put(ev(op[1], str(op[2]), ent=op[3]), now)
        elif op[0] == "take":
            held.extend(buf.take(now, op[1], 1 << 20))
        elif op[0] == "settle" and held:
            settled += sum(1 for e in held if not e.done)
            buf.settle(held)
            held = []
        elif op[0] == "requeue" and held:
            buf.requeue(held)
            held = []
        elif op[0] == "degrade":
            buf.degraded = op[1]
        elif op[0] == "tick":
            now += op[1]
            buf.expire(now)
        dropped = sum(buf.counters.dropped.values())
        assert buf.counters.enqueued == settled + dropped + buf.queued + buf.held
        assert buf.queued + buf.held <= 8
        assert buf.queued == sum(buf.queued_by_enterprise().values())
        assert buf._popups == sum(q.live_popups for q in buf._queues.values())
