"""The outbox on a real PostgreSQL: group commit, idempotency, claims, leases, retries, replay."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator

import asyncpg
import pytest

from retailcrm_service.pipeline import outbox as outbox_module
from retailcrm_service.pipeline.outbox import (
    GroupCommitter,
    GroupSettler,
    OutboxConfig,
    OutboxStore,
    OutboxUnavailable,
    Outcome,
    StoredEvent,
    replay,
)
from tests.support.pg import create_enterprise
from vochi_crm_client._event import idempotency_key


def event(
    event_type: str,
    uid: str = "1764150000.101",
    *,
    enterprise: str = "0367",
    extensions: tuple[str, ...] = ("150",),
    origin: str = "live",
) -> StoredEvent:
    payload = {"UniqueId": uid, "Phone": "+375291234567", "Extensions": list(extensions)}
    exts = extensions if event_type == "dial" else ()
    return StoredEvent(
        enterprise_number=enterprise,
        event_type=event_type,
        call_unique_id=uid,
        payload=payload,
        origin=origin,
        idempotency_key=idempotency_key(enterprise, uid, event_type, exts),
    )


@pytest.fixture
async def pool(database_url: str, db: asyncpg.Connection) -> AsyncIterator[asyncpg.Pool]:
    await create_enterprise(db, "0367", integrations={"retailcrm": True})
    await create_enterprise(db, "0400", integrations={"retailcrm": False})
    p = await asyncpg.create_pool(database_url, min_size=1, max_size=6)
    try:
        yield p
    finally:
        await p.close()


async def _states(db: asyncpg.Connection) -> list[tuple[str, str, str]]:
    rows = await db.fetch("SELECT event_type, kind, state FROM retailcrm_outbox ORDER BY id")
    return [(r["event_type"], r["kind"], r["state"]) for r in rows]


async def test_concurrent_submits_share_transactions_and_report_duplicates(
    pool: asyncpg.Pool, db: asyncpg.Connection
) -> None:
    async with GroupCommitter(pool=pool) as committer:
        batches = [[event("dial", f"1.{i}"), event("hangup", f"1.{i}")] for i in range(200)]
        results = await asyncio.gather(*(committer.submit(b) for b in batches))
        assert all(r == [True, True] for r in results)
        again = await committer.submit([event("dial", "1.5"), event("dial", "9.9")])
        assert again == [False, True]
        assert committer.transactions < 200
    assert await db.fetchval("SELECT count(*) FROM retailcrm_outbox") == 401


async def test_duplicate_inside_one_request_is_stored_once(
    pool: asyncpg.Pool, db: asyncpg.Connection
) -> None:
    async with GroupCommitter(pool=pool) as committer:
        assert await committer.submit([event("hangup"), event("hangup")]) == [True, False]
    assert await db.fetchval("SELECT count(*) FROM retailcrm_outbox") == 1


async def test_later_dial_with_new_extensions_is_a_new_event(
    pool: asyncpg.Pool, db: asyncpg.Connection
) -> None:
    async with GroupCommitter(pool=pool) as committer:
        first = event("dial", extensions=("150", "151"))
        second = event("dial", extensions=("151", "150", "152"))
        repeat = event("dial", extensions=("151", "150"))
        assert await committer.submit([first, second, repeat]) == [True, True, False]


async def test_unknown_and_disabled_enterprises_are_recorded_as_skipped(
    pool: asyncpg.Pool, db: asyncpg.Connection
) -> None:
    async with GroupCommitter(pool=pool) as committer:
        await committer.submit([event("dial", enterprise="9999"), event("dial", enterprise="0400")])
    rows = await db.fetch("SELECT state, last_error FROM retailcrm_outbox ORDER BY id")
    assert [(r["state"], r["last_error"]) for r in rows] == [
        ("skipped", "unknown enterprise"),
        ("skipped", "retailcrm disabled"),
    ]


async def test_live_hangup_is_a_popup_then_history_and_recovered_one_history_only(
    pool: asyncpg.Pool, db: asyncpg.Connection
) -> None:
    async with GroupCommitter(pool=pool) as committer:
        await committer.submit([event("bridge"), event("hangup"), event("hangup", "2.2")])
        await committer.submit([event("hangup", "3.3", origin="download")])
        # the recovered copy of a live hangup is the same fact: a duplicate
        assert await committer.submit([event("hangup", "2.2", origin="download")]) == [False]
    assert await _states(db) == [
        ("bridge", "note", "delivered"),
        ("hangup", "popup", "pending"),
        ("hangup", "popup", "pending"),
        ("hangup", "history", "pending"),
    ]


async def test_a_claimed_history_row_carries_its_calls_bridges_and_a_popup_none(
    pool: asyncpg.Pool, db: asyncpg.Connection
) -> None:
    """The bridges attribute a call to who answered; the claim reads them with the row (one
    statement instead of a second SELECT per history batch)."""
    first, second = event("bridge", "4.4"), event("bridge", "4.4", extensions=("151",))
    second = dataclasses.replace(second, idempotency_key="bridge-2")
    async with GroupCommitter(pool=pool) as committer:
        await committer.submit([first, second, event("dial", "5.5")])
        await committer.submit([event("hangup", "4.4", origin="download")])
        await committer.submit([event("hangup", "6.6", origin="download")])
    store = OutboxStore(pool=pool, owner="w")
    claimed = {(r.call_unique_id, r.kind): r for r in await store.claim(10)}
    assert claimed["4.4", "history"].bridges == [first.payload, second.payload]
    assert claimed["6.6", "history"].bridges == []
    assert claimed["5.5", "popup"].bridges is None


@pytest.mark.parametrize("gather", [0.5, 0.0])
async def test_a_delivered_hangup_popup_makes_its_history_due_on_the_gather_grid(
    pool: asyncpg.Pool, db: asyncpg.Connection, gather: float
) -> None:
    """History comes due at the next tick of a grid, the same instant for every call that ended
    within the interval, so one claim and one calls/upload take them together."""
    async with GroupCommitter(pool=pool) as committer:
        await committer.submit([event("hangup", f"G.{i}") for i in range(3)])
    store = OutboxStore(pool=pool, owner="w", config=OutboxConfig(history_gather=gather))
    popups = await store.claim(10)
    assert [r.kind for r in popups] == ["popup"] * 3
    if gather:
        # Settle early in an interval of the grid: settles either side of a tick are (rightly)
        # due a tick apart, and the three take far less than half an interval.
        into = time.time() % gather
        if into > gather / 4:
            await asyncio.sleep(gather - into + 0.01)
    for row in popups:  # settled one by one, at different moments
        await store.settle([Outcome(row, "delivered")])
    rows = await db.fetch(
        "SELECT kind, state, extract(epoch FROM due_at)::float8 AS due, "
        "extract(epoch FROM now())::float8 AS now FROM retailcrm_outbox"
    )
    assert {(r["kind"], r["state"]) for r in rows} == {("history", "pending")}
    if gather:
        assert len({r["due"] for r in rows}) == 1  # settled apart, due together
        due = rows[0]["due"]
        assert due == pytest.approx(round(due / gather) * gather, abs=1e-6)
        assert 0 <= due - rows[0]["now"] <= gather
        assert await store.claim(10) == []  # not before the tick
        await asyncio.sleep(due - rows[0]["now"] + 0.02)
    taken = await store.claim(10)
    assert sorted(r.call_unique_id for r in taken) == ["G.0", "G.1", "G.2"]
    assert {r.kind for r in taken} == {"history"}


def test_history_gather_is_bounded() -> None:
    with pytest.raises(ValueError, match="history_gather"):
        OutboxConfig(history_gather=-1)
    with pytest.raises(ValueError, match="history_gather"):
        OutboxConfig(history_gather=61)


async def test_failed_transaction_reaches_every_waiter_and_stores_nothing(
    pool: asyncpg.Pool, db: asyncpg.Connection
) -> None:
    await db.execute(
        "ALTER TABLE retailcrm_outbox ADD CONSTRAINT no_x CHECK (call_unique_id <> 'x')"
    )
    async with GroupCommitter(pool=pool) as committer:
        results = await asyncio.gather(
            committer.submit([event("dial", "x")]),
            committer.submit([event("dial", "y")]),
            return_exceptions=True,
        )
    assert any(isinstance(r, OutboxUnavailable) for r in results)
    stored = await db.fetchval("SELECT count(*) FROM retailcrm_outbox WHERE call_unique_id = 'x'")
    assert stored == 0


async def test_claim_delivers_a_call_in_order_and_skip_locked_splits_work(
    pool: asyncpg.Pool, db: asyncpg.Connection
) -> None:
    async with GroupCommitter(pool=pool) as committer:
        await committer.submit([event("dial", "A"), event("hangup", "A"), event("dial", "B")])
    one = OutboxStore(pool=pool, owner="w1")
    two = OutboxStore(pool=pool, owner="w2")
    first, second = await asyncio.gather(one.claim(10), two.claim(10))
    claimed = sorted((r.call_unique_id, r.event_type) for r in first + second)
    # the hangup of call A waits for its dial; no row is claimed twice
    assert claimed == [("A", "dial"), ("B", "dial")]
    dial_a = next(r for r in first + second if r.call_unique_id == "A")
    owner = one if dial_a in first else two
    await owner.settle([Outcome(dial_a, "delivered")])
    next_rows = await one.claim(10)
    assert [(r.call_unique_id, r.event_type) for r in next_rows] == [("A", "hangup")]


async def test_lease_of_a_dead_worker_lapses_and_another_worker_takes_the_row(
    pool: asyncpg.Pool, db: asyncpg.Connection
) -> None:
    config = OutboxConfig(lease_seconds=0.2)
    async with GroupCommitter(pool=pool) as committer:
        await committer.submit([event("hangup", "L", origin="download")])
    dead = OutboxStore(pool=pool, owner="dead", config=config)
    alive = OutboxStore(pool=pool, owner="alive", config=config)
    assert len(await dead.claim(5)) == 1
    assert await alive.claim(5) == []
    await asyncio.sleep(0.3)
    taken = await alive.claim(5)
    assert [r.attempts for r in taken] == [2]
    # the dead worker's late settle no longer applies: the row is someone else's now
    await dead.settle([Outcome(taken[0], "delivered")])
    assert await db.fetchval("SELECT state FROM retailcrm_outbox") == "pending"


async def test_leases_of_an_instance_silent_past_dead_after_are_released_at_once(
    pool: asyncpg.Pool, db: asyncpg.Connection
) -> None:
    """A killed instance's rows go out again when it is taken for dead, not when their (long)
    leases run out; an instance silent for less keeps its leases."""
    async with GroupCommitter(pool=pool) as committer:
        await committer.submit(
            [event("hangup", uid, origin="download") for uid in ("K1", "K2", "S1")]
        )
    killed = OutboxStore(pool=pool, owner="killed")  # 60 s leases
    stalled = OutboxStore(pool=pool, owner="stalled")
    alive = OutboxStore(pool=pool, owner="alive")
    await killed.heartbeat(alive_within=5.0)
    await stalled.heartbeat(alive_within=5.0)
    assert len(await killed.claim(2)) == 2
    assert len(await stalled.claim(5)) == 1
    await db.execute(
        "UPDATE retailcrm_delivery_instances SET seen_at = now() - CASE owner"
        " WHEN 'killed' THEN interval '20 seconds' ELSE interval '8 seconds' END"
    )
    assert await alive.claim(5) == []  # every row is leased
    assert await alive.heartbeat(alive_within=5.0, dead_after=15.0) == 1
    assert alive.leases_released == 2
    taken = await alive.claim(5)
    assert sorted(r.call_unique_id for r in taken) == ["K1", "K2"]
    owners = await db.fetch("SELECT owner FROM retailcrm_delivery_instances ORDER BY owner")
    assert [r["owner"] for r in owners] == ["alive", "stalled"]
    # the killed instance's late settle applies to nothing; a second heartbeat releases nothing
    await killed.settle([Outcome(taken[0], "delivered")])
    assert await db.fetchval("SELECT state FROM retailcrm_outbox WHERE call_unique_id = 'K1'") == (
        "pending"
    )
    await alive.heartbeat(alive_within=5.0, dead_after=15.0)
    assert alive.leases_released == 2


async def test_retry_is_persisted_with_backoff_and_dead_letters_past_max_attempts(
    pool: asyncpg.Pool, db: asyncpg.Connection
) -> None:
    config = OutboxConfig(max_attempts=2)
    store = OutboxStore(pool=pool, owner="w", config=config)
    async with GroupCommitter(pool=pool) as committer:
        await committer.submit([event("hangup", "R", origin="download")])
    (row,) = await store.claim(5)
    await store.settle([Outcome(row, "retry", "HTTP 500", retry_after=0.0)])
    stored = await db.fetchrow("SELECT state, attempts, last_error FROM retailcrm_outbox")
    assert tuple(stored) == ("pending", 1, "HTTP 500")
    (row,) = await store.claim(5)
    await store.settle([Outcome(row, "retry", "HTTP 500 again")])
    stored = await db.fetchrow("SELECT state, attempts, last_error FROM retailcrm_outbox")
    assert tuple(stored) == ("dead", 2, "HTTP 500 again")


async def test_breaker_deferral_does_not_use_up_attempts(
    pool: asyncpg.Pool, db: asyncpg.Connection
) -> None:
    store = OutboxStore(pool=pool, owner="w")
    async with GroupCommitter(pool=pool) as committer:
        await committer.submit([event("hangup", "D", origin="download")])
    (row,) = await store.claim(5)
    await store.settle([Outcome(row, "deferred", "breaker open", retry_after=0.0)])
    assert await db.fetchval("SELECT attempts FROM retailcrm_outbox") == 0


async def test_stale_popups_expire_and_a_hangup_moves_on_to_history(
    pool: asyncpg.Pool, db: asyncpg.Connection
) -> None:
    config = OutboxConfig(popup_ttl=0.05)
    async with GroupCommitter(pool=pool, config=config) as committer:
        await committer.submit([event("dial", "E"), event("hangup", "E")])
    await asyncio.sleep(0.1)
    swept = await OutboxStore(pool=pool, owner="w", config=config).sweep()
    assert swept["expired"] == ["0367", "0367"]
    rows = await db.fetch("SELECT kind, state, popup_state FROM retailcrm_outbox ORDER BY id")
    assert [tuple(r) for r in rows] == [
        ("popup", "expired", "expired"),
        ("history", "pending", "expired"),
    ]


async def test_failed_dial_is_superseded_once_its_hangup_is_queued(
    pool: asyncpg.Pool, db: asyncpg.Connection
) -> None:
    store = OutboxStore(pool=pool, owner="w")
    async with GroupCommitter(pool=pool) as committer:
        await committer.submit([event("dial", "S")])
        (dial,) = await store.claim(5)
        await store.settle([Outcome(dial, "retry", "timeout", retry_after=60.0)])
        await committer.submit([event("hangup", "S")])
    assert (await store.sweep())["superseded"] == ["0367"]
    (hangup,) = await store.claim(5)
    assert (hangup.event_type, hangup.kind) == ("hangup", "popup")


async def test_a_late_dial_is_superseded_once_its_hangup_is_queued_a_fresh_one_is_not(
    pool: asyncpg.Pool, db: asyncpg.Connection
) -> None:
    """A dial deferred by an open breaker keeps no attempt, yet once it waited past
    supersede_after with its hangup queued it is pointless: superseded, not shown late after
    the outage. A dial whose hangup followed at once (a short call) still goes out."""
    store = OutboxStore(pool=pool, owner="w", config=OutboxConfig(supersede_after=1.0))
    async with GroupCommitter(pool=pool) as committer:
        await committer.submit([event("dial", "LATE"), event("dial", "SHORT")])
        (deferred,) = await store.claim(1)  # the first committed: LATE's dial
        assert deferred.call_unique_id == "LATE"
        await store.settle([Outcome(deferred, "deferred", "breaker open", retry_after=30.0)])
        await committer.submit([event("hangup", "LATE"), event("hangup", "SHORT")])
    await db.execute(
        "UPDATE retailcrm_outbox SET created_at = created_at - interval '5 seconds'"
        " WHERE call_unique_id = 'LATE' AND event_type = 'dial'"
    )
    assert (await store.sweep())["superseded"] == ["0367"]
    rows = await db.fetch(
        "SELECT call_unique_id, state, attempts FROM retailcrm_outbox"
        " WHERE event_type = 'dial' ORDER BY call_unique_id"
    )
    assert [tuple(r) for r in rows] == [("LATE", "superseded", 0), ("SHORT", "pending", 0)]


async def test_replay_makes_dead_events_of_an_enterprise_pending_again(
    pool: asyncpg.Pool, db: asyncpg.Connection
) -> None:
    store = OutboxStore(pool=pool, owner="w", config=OutboxConfig(max_attempts=1))
    async with GroupCommitter(pool=pool) as committer:
        await committer.submit([event("hangup", f"P{i}", origin="download") for i in range(3)])
    rows = await store.claim(5)
    await store.settle([Outcome(r, "dead", "400: Validation error") for r in rows])
    assert (await replay(pool, enterprise_number="0367")).replayed == 3
    assert len(await store.claim(5)) == 3
    backlog = await store.backlog()
    assert backlog["pending"] == 3


async def test_replay_by_id_or_key_leaves_a_leased_row_alone_and_says_so(
    pool: asyncpg.Pool, db: asyncpg.Connection
) -> None:
    worker = OutboxStore(pool=pool, owner="w1", config=OutboxConfig(lease_seconds=60))
    other = OutboxStore(pool=pool, owner="w2")
    async with GroupCommitter(pool=pool) as committer:
        await committer.submit([event("hangup", "L1", origin="download")])
    (row,) = await worker.claim(5)  # a request for this row is in flight now
    by_id = await replay(pool, enterprise_number="0367", event_id=row.id)
    by_key = await replay(pool, enterprise_number="0367", idempotency_key=row.idempotency_key)
    assert (by_id.replayed, by_id.leased) == (0, 1)
    assert (by_key.replayed, by_key.leased) == (0, 1)
    lease = await db.fetchrow("SELECT lease_owner, attempts FROM retailcrm_outbox")
    assert (lease["lease_owner"], lease["attempts"]) == ("w1", 1)
    assert await other.claim(5) == []  # nobody else may send it mid-request
    await worker.settle([Outcome(row, "delivered")])
    # once settled, the same replay brings it back
    again = await replay(pool, enterprise_number="0367", event_id=row.id)
    assert (again.replayed, again.leased) == (1, 0)
    assert len(await other.claim(5)) == 1


async def test_dial_arriving_after_its_hangup_is_never_sent_and_is_superseded(
    pool: asyncpg.Pool, db: asyncpg.Connection
) -> None:
    store = OutboxStore(pool=pool, owner="w", config=OutboxConfig(history_gather=0))
    async with GroupCommitter(pool=pool) as committer:
        await committer.submit([event("hangup", "Z")])
        await committer.submit([event("dial", "Z")])
    (hangup,) = await store.claim(5)
    await store.settle([Outcome(hangup, "delivered")])
    assert [r.event_type for r in await store.claim(5)] == ["hangup"]  # its history stage
    assert (await store.sweep())["superseded"] == ["0367"]


async def test_concurrent_settles_share_statements_and_each_caller_sees_its_own_rows_stored(
    pool: asyncpg.Pool, db: asyncpg.Connection
) -> None:
    async with GroupCommitter(pool=pool) as committer:
        await committer.submit([event("dial", f"S.{i}") for i in range(30)])
    store = OutboxStore(pool=pool, owner="w1")
    rows = await store.claim(30)
    assert len(rows) == 30
    settler = GroupSettler(store)
    await asyncio.gather(*(settler.settle([Outcome(r, "delivered")]) for r in rows))
    assert settler.settled == 30
    assert settler.statements < 30  # the first runs alone; the others wait and go together
    assert (
        await db.fetchval(
            "SELECT count(*) FROM retailcrm_outbox"
            " WHERE state = 'delivered' AND lease_owner IS NULL"
        )
        == 30
    )


async def test_settles_arriving_within_the_linger_go_in_one_statement(
    pool: asyncpg.Pool, db: asyncpg.Connection
) -> None:
    """Without a statement running, settles a few ms apart (requests of different enterprises
    ending) would each run their own UPDATE; the leader's linger gathers them."""
    async with GroupCommitter(pool=pool) as committer:
        await committer.submit([event("dial", f"L.{i}") for i in range(4)])
    store = OutboxStore(pool=pool, owner="w1")
    rows = await store.claim(4)

    async def later(index: int, settler: GroupSettler) -> None:
        await asyncio.sleep(0.02 * index)
        await settler.settle([Outcome(rows[index], "delivered")])

    lingering = GroupSettler(store, linger=0.5)
    await asyncio.gather(*(later(i, lingering) for i in range(4)))
    assert (lingering.statements, lingering.settled) == (1, 4)
    assert await db.fetchval("SELECT count(*) FROM retailcrm_outbox WHERE state = 'delivered'") == 4


async def test_a_failed_group_settle_reaches_its_callers_and_the_next_group_still_runs(
    pool: asyncpg.Pool, db: asyncpg.Connection
) -> None:
    async with GroupCommitter(pool=pool) as committer:
        await committer.submit([event("dial", f"F.{i}") for i in range(3)])
    store = OutboxStore(pool=pool, owner="w1")
    first, second, third = await store.claim(3)
    calls = 0
    real_settle = store.settle

    async def flaky(outcomes: list[Outcome]) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:  # the second statement: the group of the two that waited
            raise asyncpg.exceptions.ConnectionDoesNotExistError("gone")
        await real_settle(outcomes)

    store.settle = flaky  # type: ignore[method-assign]
    settler = GroupSettler(store)
    results = await asyncio.gather(
        settler.settle([Outcome(first, "delivered")]),
        settler.settle([Outcome(second, "delivered")]),
        settler.settle([Outcome(third, "delivered")]),
        return_exceptions=True,
    )
    assert results[0] is None
    assert all(isinstance(r, asyncpg.exceptions.ConnectionDoesNotExistError) for r in results[1:])
    # The failed rows stay leased (claimed again when the lease lapses); a later settle runs.
    states = dict(await db.fetch("SELECT call_unique_id, state FROM retailcrm_outbox"))
    assert states == {"F.0": "delivered", "F.1": "pending", "F.2": "pending"}
    await settler.settle([Outcome(second, "delivered")])
    assert await db.fetchval("SELECT state FROM retailcrm_outbox WHERE id = $1", second.id) == (
        "delivered"
    )


async def test_a_cancelled_leader_leaves_no_caller_waiting_forever(pool: asyncpg.Pool) -> None:
    async with GroupCommitter(pool=pool) as committer:
        await committer.submit([event("dial", f"C.{i}") for i in range(2)])
    store = OutboxStore(pool=pool, owner="w1")
    first, second = await store.claim(2)
    entered = asyncio.Event()

    async def stuck(outcomes: list[Outcome]) -> None:
        entered.set()
        await asyncio.sleep(3600)

    store.settle = stuck  # type: ignore[method-assign]
    settler = GroupSettler(store)
    leader = asyncio.create_task(settler.settle([Outcome(first, "delivered")]))
    await entered.wait()
    follower = asyncio.create_task(settler.settle([Outcome(second, "delivered")]))
    await asyncio.sleep(0)
    leader.cancel()
    with pytest.raises(RuntimeError, match="settle interrupted"):
        await asyncio.wait_for(follower, 5)
    with pytest.raises(asyncio.CancelledError):
        await leader


async def test_statistics_are_refreshed_when_a_fresh_outbox_outgrows_them(
    pool: asyncpg.Pool, db: asyncpg.Connection
) -> None:
    store = OutboxStore(pool=pool, owner="w1")
    async with GroupCommitter(pool=pool) as committer:
        await committer.submit([event("dial", f"A.{i}") for i in range(1500)])
    # pg_stat counters reach the view when the writing backend reports them (at most ~1 s).
    deadline = asyncio.get_running_loop().time() + 10
    while not await store.keep_statistics():
        assert asyncio.get_running_loop().time() < deadline, "never analyzed"
        await asyncio.sleep(0.2)
    analyzed = await db.fetchval(
        "SELECT reltuples FROM pg_class WHERE oid = 'retailcrm_outbox'::regclass"
    )
    assert analyzed == 1500
    assert await store.keep_statistics() is False  # up to date: nothing to do


async def test_the_outbox_is_vacuumed_and_analyzed_as_a_queue(db: asyncpg.Connection) -> None:
    options = await db.fetchval(
        "SELECT reloptions FROM pg_class WHERE oid = 'retailcrm_outbox'::regclass"
    )
    assert "autovacuum_analyze_scale_factor=0.02" in options
    assert "autovacuum_vacuum_scale_factor=0.02" in options


async def test_a_claim_probes_the_calls_it_takes_and_never_scans_the_outbox(
    pool: asyncpg.Pool, db: asyncpg.Connection
) -> None:
    """The claim's per-call lookups (an earlier pending row, a hangup before a dial, the dial
    that opened a hangup's card) and the update of the rows it took are index probes: with only
    equalities PostgreSQL ran ``card_opened`` as one hashed scan of the whole outbox per claim,
    and the update as a hash join over another, a cost that grew with the retention."""
    await db.execute(
        """INSERT INTO retailcrm_outbox (enterprise_number, idempotency_key, kind, call_unique_id,
                                         event_type, payload, state, finished_at)
           SELECT '0367', 'old-' || i || '-' || t, 'popup', 'old.' || i, t, '{}', 'delivered', now()
           FROM generate_series(1, 3000) AS i, unnest(ARRAY['dial', 'hangup']) AS t"""
    )
    async with GroupCommitter(pool=pool) as committer:
        await committer.submit([event("dial", f"C.{i}") for i in range(40)])
    store = OutboxStore(pool=pool, owner="w")
    for row in await store.claim(100):
        await store.settle([Outcome(row, "delivered")])
    async with GroupCommitter(pool=pool) as committer:
        await committer.submit([event("hangup", f"C.{i}") for i in range(40)])
    await db.execute("ANALYZE retailcrm_outbox")
    plan = "\n".join(
        r[0] for r in await db.fetch("EXPLAIN " + outbox_module._CLAIM, "w", 200, 60.0, [])
    )
    assert "Seq Scan" not in plan, plan
    assert "hashed" not in plan, plan
    taken = await store.claim(100)
    assert len(taken) == 40
    assert {(r.event_type, r.card_opened) for r in taken} == {("hangup", True)}
