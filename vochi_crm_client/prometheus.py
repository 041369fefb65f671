"""Prometheus exposition of a ``CrmClient``'s counters, for any host application.

::

    from prometheus_client import CollectorRegistry, generate_latest
    from vochi_crm_client.prometheus import CrmClientCollector

    registry = CollectorRegistry()
    registry.register(CrmClientCollector(lambda: crm))   # read at every scrape
    generate_latest(registry)

The collector reads ``crm.stats()`` at scrape time. Counts that only grow are counters (their
samples end in ``_total``), levels are gauges; targets, caches, drop reasons and outcomes are
labels, never parts of a metric name. No enterprise number is exported: per-enterprise detail
stays in ``stats()``.

``cache_families`` and ``listener_families`` export the stats of any ``RefreshingCache`` and
``ChangeListener`` the same way; the RetailCRM service uses them for its own caches and listener.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["CrmClientCollector", "cache_families", "listener_families"]

# RefreshingCache.stats() lookup counters -> the ``result`` label. The four are disjoint: a fresh
# hit, a stale value served while it is revalidated, a cached "does not exist", a miss.
_CACHE_RESULTS = (
    ("hits", "hit"),
    ("stale_hits", "stale_hit"),
    ("negative_hits", "negative_hit"),
    ("misses", "miss"),
)
_CACHE_COUNTERS = (
    ("loads", "cache_loads", "Entry loads from the source"),
    ("load_errors", "cache_load_errors", "Entry loads that failed (the old value is kept)"),
    ("full_reloads", "cache_full_reloads", "Full reloads of the cache"),
    ("full_reload_errors", "cache_full_reload_errors", "Full reloads that failed"),
    ("invalidations", "cache_invalidations", "Entries invalidated by a change notification"),
)
_LISTENER_COUNTERS = (
    ("connects", "listener_connects", "LISTEN connections opened"),
    ("disconnects", "listener_disconnects", "LISTEN connections lost"),
    ("connect_errors", "listener_connect_errors", "Failed attempts to open the LISTEN connection"),
    ("notifications", "listener_notifications", "Change notifications received"),
    ("reloads", "listener_reloads", "Full reloads run after a (re)connect"),
    ("reload_errors", "listener_reload_errors", "Full reloads after a (re)connect that failed"),
    ("heartbeats_sent", "listener_heartbeats_sent", "Heartbeat notifications sent"),
    ("heartbeats_received", "listener_heartbeats_received", "Heartbeat notifications received"),
)
_TARGET_COUNTERS = (
    ("enqueued", "enqueued_events", "Events queued for the target"),
    ("sent", "sent_events", "Events sent in batch POSTs (retries included)"),
    ("delivered", "delivered_events", "Events the target acknowledged as stored"),
    ("duplicates", "duplicate_events", "Events the target already had (idempotency key)"),
    ("rejected", "rejected_events", "Events the target rejected as invalid"),
    ("retried", "retried_events", "Events sent again after a retryable failure"),
    ("requeued", "requeued_events", "Events put back in the queue after a failed batch"),
    ("batches", "batches", "Batch POSTs made"),
    ("batches_failed", "failed_batches", "Batch POSTs that failed"),
)
_EMIT_OUTCOMES = ("routed", "unknown_enterprise", "no_target", "pending_overflow", "not_open")
_BREAKER_STATES = ("closed", "open", "half_open")


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _counter(prefix: str, name: str, doc: str, labels: Iterable[str] = ()) -> CounterMetricFamily:
    return CounterMetricFamily(f"{prefix}_{name}", doc, labels=list(labels))


def _gauge(prefix: str, name: str, doc: str, labels: Iterable[str] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{prefix}_{name}", doc, labels=list(labels))


def cache_families(prefix: str, caches: Mapping[str, Mapping[str, Any]]) -> list[Metric]:
    """``{prefix}_cache_*`` families, labelled ``cache``, from ``{cache name: cache.stats()}``."""
    lookups = _counter(prefix, "cache_lookups", "Cache lookups by result", ("cache", "result"))
    counters = {key: _counter(prefix, name, doc, ("cache",)) for key, name, doc in _CACHE_COUNTERS}
    entries = _gauge(prefix, "cache_entries", "Entries held (positive)", ("cache",))
    negative = _gauge(
        prefix, "cache_negative_entries", "Entries held as 'does not exist'", ("cache",)
    )
    age = _gauge(
        prefix, "cache_snapshot_age_seconds", "Seconds since the last full reload", ("cache",)
    )
    for cache, stats in caches.items():
        for key, result in _CACHE_RESULTS:
            value = _number(stats.get(key))
            if value is not None:
                lookups.add_metric([cache, result], value)
        for key, family in counters.items():
            value = _number(stats.get(key))
            if value is not None:
                family.add_metric([cache], value)
        for key, gauge in (("size", entries), ("negative_size", negative), ("snapshot_age", age)):
            value = _number(stats.get(key))
            if value is not None:
                gauge.add_metric([cache], value)
    return [lookups, *counters.values(), entries, negative, age]


def listener_families(prefix: str, stats: Mapping[str, Any]) -> list[Metric]:
    """``{prefix}_listener_*`` families from a ``ChangeListener.stats()``."""
    connected = _gauge(
        prefix, "listener_connected", "1 while the LISTEN connection is up and listening"
    )
    connected.add_metric([], 1.0 if stats.get("state") == "listening" else 0.0)
    out: list[Metric] = [connected]
    for key, name, doc in _LISTENER_COUNTERS:
        value = _number(stats.get(key))
        if value is not None:
            family = _counter(prefix, name, doc)
            family.add_metric([], value)
            out.append(family)
    age = _number(stats.get("heartbeat_age"))
    if age is not None:
        gauge = _gauge(
            prefix, "listener_heartbeat_age_seconds", "Seconds since the last heartbeat returned"
        )
        gauge.add_metric([], age)
        out.append(gauge)
    return out


class CrmClientCollector(Collector):
    """Exports ``client().stats()`` as ``vochi_crm_client_*`` (see the module docstring).

    ``client`` is a callable so the collector can be registered before the client is opened;
    while it returns None nothing is exported.
    """

    def __init__(self, client: Callable[[], Any], *, prefix: str = "vochi_crm_client") -> None:
        self._client = client
        self._prefix = prefix

    def collect(self) -> Iterator[Metric]:
        client = self._client()
        if client is None:
            return
        yield from self.families(client.stats())

    def families(self, stats: Mapping[str, Any]) -> list[Metric]:
        """The families for one ``CrmClient.stats()`` snapshot."""
        p = self._prefix
        out: list[Metric] = []
        emitted = _counter(p, "emitted_events", "Events passed to emit()")
        emitted.add_metric([], _number(stats.get("emitted")) or 0.0)
        outcomes = _counter(
            p, "emit_outcomes", "What became of emitted events, by outcome", ("outcome",)
        )
        for outcome in _EMIT_OUTCOMES:
            outcomes.add_metric([outcome], _number(stats.get(outcome)) or 0.0)
        resolve_errors = _counter(p, "resolve_errors", "Matrix loads that failed for an event")
        resolve_errors.add_metric([], _number(stats.get("resolve_errors")) or 0.0)
        pending = _gauge(p, "pending_events", "Events waiting for their enterprise's matrix load")
        pending.add_metric([], _number(stats.get("pending")) or 0.0)
        out += [emitted, outcomes, resolve_errors, pending]
        out += self._target_families(stats.get("targets") or {})
        matrix = stats.get("matrix") or {}
        caches = {n: matrix[n] for n in ("matrix", "tokens") if isinstance(matrix.get(n), Mapping)}
        out += cache_families(p, caches)
        if isinstance(matrix.get("listener"), Mapping):
            out += listener_families(p, matrix["listener"])
        return out

    def _target_families(self, targets: Mapping[str, Mapping[str, Any]]) -> list[Metric]:
        p = self._prefix
        counters = {key: _counter(p, name, doc, ("target",)) for key, name, doc in _TARGET_COUNTERS}
        queued = _gauge(p, "queued_events", "Events queued for the target", ("target",))
        in_flight = _gauge(p, "in_flight_batches", "Batch POSTs in flight", ("target",))
        dropped = _counter(
            p, "dropped_events", "Events dropped without delivery, by reason", ("target", "reason")
        )
        state = _gauge(
            p, "breaker_state", "1 for the target's current breaker state", ("target", "state")
        )
        opened = _counter(p, "breaker_opened", "Times the target's breaker opened", ("target",))
        for target, stats in targets.items():
            for key, family in counters.items():
                family.add_metric([target], _number(stats.get(key)) or 0.0)
            queued.add_metric([target], _number(stats.get("queued")) or 0.0)
            in_flight.add_metric([target], _number(stats.get("in_flight")) or 0.0)
            for reason, count in (stats.get("dropped") or {}).items():
                dropped.add_metric([target, str(reason)], _number(count) or 0.0)
            breaker = stats.get("breaker") or {}
            current = str(breaker.get("state", "closed"))
            for name in _BREAKER_STATES:
                state.add_metric([target, name], 1.0 if name == current else 0.0)
            opened.add_metric([target], _number(breaker.get("opened_total")) or 0.0)
        return [*counters.values(), queued, in_flight, dropped, state, opened]
