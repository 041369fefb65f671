"""Prometheus metrics with a per-app registry, and the pluggable sources of ``/stats``.

``Metrics`` is built by ``create_app`` (``app.state.metrics``, also ``runtime.metrics``):

- ``metrics.registry``: the app's own ``CollectorRegistry``; other components create their
  collectors with ``registry=metrics.registry`` (never the global default registry).
- instrumented series: ``http_requests`` and ``http_seconds`` (by route template, never by raw
  path), ``intake_commit_seconds``, ``retailcrm_calls``, and every request to RetailCRM, heard
  by ``observe_crm`` (``retailcrm_service_crm_requests_total`` and its latency histogram);
- ``metrics.add_source(name, fn)``: ``fn() -> dict`` becomes ``/stats[name]``. ``/metrics`` reads
  the known sources at scrape time and exports them as typed families (counters as counters,
  levels as gauges, names fixed, variable parts as labels): see ``_ServiceCollector`` and the
  list in docs/operations.md. Sources must not hold secrets.

Enterprise numbers appear as a label in one place only, ``retailcrm_service_delivery_breaker_open``,
and only while that enterprise's breaker is not closed, so the series count is bounded by the
accounts failing right now; everything per enterprise is in ``/stats``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from vochi_crm_client.prometheus import cache_families, listener_families

logger = logging.getLogger(__name__)

StatsSource = Callable[[], Mapping[str, Any]]
PREFIX = "retailcrm_service"

# Latency buckets, seconds: requests answered in milliseconds up to RetailCRM's 3 s timeout.
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# Path segments of the RetailCRM API methods we call; any other segment is an id or a code and
# becomes ``{id}``, so the ``endpoint`` label has a bounded set of values.
_CRM_WORDS = frozenset(
    {
        "telephony", "call", "event", "calls", "upload", "manager", "users", "status",
        "customers", "orders", "integration-modules", "edit", "credentials", "api-versions",
    }
)  # fmt: skip


def crm_endpoint(path: str) -> str:
    """``/api/v5/users/19/status`` -> ``users/{id}/status`` (the label of a RetailCRM request)."""
    rest = re.sub(r"^/api/(v\d+/)?", "", path)
    return "/".join(s if s in _CRM_WORDS else "{id}" for s in rest.strip("/").split("/")[:4])


def _crm_outcome(status: int) -> str:
    if 200 <= status < 300:
        return "ok"
    if status in (429, 503):
        return "rate_limited"  # RetailCRM answers 503 past its per-key limit
    if 400 <= status < 500:
        return "rejected"
    return "server_error"


class _ServiceCollector(Collector):
    """The ``/stats`` sources as typed families, read at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        stats: dict[str, Any] = self._metrics.snapshot()
        yield from _service(stats.get("service") or {})
        smart_redirect = stats.get("smart_redirect") or {}
        caches: dict[str, Any] = {
            "config": stats.get("config_cache"),
            "smart_redirect": smart_redirect.get("cache"),
        }
        yield from cache_families(PREFIX, {k: v for k, v in caches.items() if _ok(v)})
        if _ok(stats.get("listener")):
            yield from listener_families(PREFIX, stats["listener"])
        yield from _flat("journal", stats.get("integration_logs"), _JOURNAL)
        yield from _flat("asterisk", stats.get("asterisk"), _ASTERISK)
        yield from _flat("smart_redirect", smart_redirect, _SMART_REDIRECT)
        outbox = stats.get("outbox") or {}
        if _ok(outbox) and outbox:
            yield from _intake(outbox.get("intake") or {})
            yield from _flat("outbox", outbox.get("backlog"), _BACKLOG)
            yield from _flat("delivery", outbox, _DELIVERY)
            yield from _breakers(outbox.get("breakers") or {})


def _ok(section: Any) -> bool:
    return isinstance(section, Mapping) and "error" not in section


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


# (stats key, metric name after the area prefix, counter?, help) of flat stats sections.
_Spec = tuple[tuple[str, str, bool, str], ...]
_JOURNAL: _Spec = (
    ("written", "written_rows", True, "Journal rows queued for writing"),
    ("stored", "stored_rows", True, "Journal rows stored"),
    ("dropped", "dropped_rows", True, "Journal rows dropped (queue full)"),
    ("lost", "lost_rows", True, "Journal rows lost with a failed batch"),
    ("failed_batches", "failed_batches", True, "Journal batches that failed to store"),
    ("purged", "purged_rows", True, "Journal rows deleted by retention"),
    ("queued", "queued_rows", False, "Journal rows waiting to be stored"),
)
_ASTERISK: _Spec = (
    ("connects", "connects", True, "SSH connections opened to Asterisk hosts"),
    ("commands", "commands", True, "Commands run on Asterisk hosts"),
    ("failures", "failures", True, "Asterisk commands or connections that failed"),
    ("jobs_started", "jobs_started", True, "Background redirect/originate jobs started"),
    ("jobs_rejected", "jobs_rejected", True, "Background jobs refused (too many running)"),
    ("open_connections", "open_connections", False, "SSH connections open now"),
    ("background_jobs", "background_jobs", False, "Background jobs running now"),
)
_SMART_REDIRECT: _Spec = (
    ("decisions", "decisions", True, "Smart-redirect answers given"),
    ("timeouts", "timeouts", True, "Smart-redirect lookups past their deadline (no redirect)"),
    ("errors", "errors", True, "Smart-redirect lookups that failed (no redirect)"),
)
_BACKLOG: _Spec = (
    ("pending", "pending_rows", False, "Outbox rows not yet delivered, expired or dead"),
    ("due", "due_rows", False, "Pending outbox rows due now"),
    ("oldest_due_age_seconds", "oldest_due_age_seconds", False, "Age of the oldest due row"),
)
_DELIVERY: _Spec = (
    ("loop_errors", "loop_errors", True, "Failures of the delivery loop (it keeps running)"),
    (
        "leases_released",
        "dead_instance_leases_released",
        True,
        "Outbox rows of instances taken for dead handed back before their leases ran out",
    ),
    ("instances", "instances", False, "Service instances sharing delivery (heartbeats)"),
    ("pacing_share", "pacing_share", False, "This instance's share of each API key's budget"),
)


def _flat(area: str, section: Any, spec: _Spec) -> Iterator[Metric]:
    if not _ok(section):
        return
    for key, name, counter, doc in spec:
        value = _number(section.get(key))
        if value is None:
            continue
        cls = CounterMetricFamily if counter else GaugeMetricFamily
        yield cls(f"{PREFIX}_{area}_{name}", doc, value=value)


def _service(section: Mapping[str, Any]) -> Iterator[Metric]:
    if "version" in section:
        info = GaugeMetricFamily(f"{PREFIX}_build_info", "Always 1", labels=["version"])
        info.add_metric([str(section["version"])], 1.0)
        yield info
    uptime = _number(section.get("uptime_s"))
    if uptime is not None:
        yield GaugeMetricFamily(f"{PREFIX}_uptime_seconds", "Seconds since start", value=uptime)


def _intake(section: Mapping[str, Any]) -> Iterator[Metric]:
    events = CounterMetricFamily(
        f"{PREFIX}_intake_events", "Events received by /api/events, by outcome", labels=["outcome"]
    )
    outcomes = (("accepted", "accepted"), ("duplicates", "duplicate"), ("rejected", "rejected"))
    for key, outcome in outcomes:
        events.add_metric([outcome], _number(section.get(key)) or 0.0)
    yield events
    yield from _flat(
        "intake",
        section,
        (
            ("transactions", "commits", True, "Group-commit transactions"),
            ("failed_transactions", "failed_commits", True, "Group commits that failed"),
            ("queued_requests", "queued_requests", False, "Requests waiting for a commit"),
        ),
    )


def _breakers(breakers: Mapping[str, Any]) -> Iterator[Metric]:
    counts = dict.fromkeys(("closed", "open", "half_open"), 0)
    for state in breakers.values():
        counts[str(state)] = counts.get(str(state), 0) + 1
    by_state = GaugeMetricFamily(
        f"{PREFIX}_delivery_breakers",
        "Enterprises' delivery breakers by state (this instance)",
        labels=["state"],
    )
    for state, count in counts.items():
        by_state.add_metric([state], float(count))
    yield by_state
    # Bounded: a series only while that enterprise's breaker is open or half-open.
    failing = GaugeMetricFamily(
        f"{PREFIX}_delivery_breaker_open",
        "1 per enterprise whose delivery breaker is not closed (no series while closed)",
        labels=["enterprise"],
    )
    for number, state in sorted(breakers.items()):
        if state != "closed":
            failing.add_metric([str(number)], 1.0)
    yield failing


class Metrics:
    """The app's registry, its instrumented series and the ``/stats`` sources."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.http_requests = Counter(
            f"{PREFIX}_http_requests",
            "HTTP requests served, by route template",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.http_seconds = Histogram(
            f"{PREFIX}_http_request_duration_seconds",
            "Time to answer an HTTP request, by route template",
            ["route", "method"],
            buckets=REQUEST_BUCKETS,
            registry=self.registry,
        )
        self.intake_commit_seconds = Histogram(
            f"{PREFIX}_intake_commit_duration_seconds",
            "From a parsed /api/events request to the commit of its events (group commit)",
            buckets=REQUEST_BUCKETS,
            registry=self.registry,
        )
        self.retailcrm_calls = Counter(
            f"{PREFIX}_retailcrm_calls",
            "Admin and config operations that called RetailCRM, by outcome",
            ["method", "outcome"],
            registry=self.registry,
        )
        self.crm_requests = Counter(
            f"{PREFIX}_crm_requests",
            "Requests to RetailCRM, by API endpoint and outcome",
            ["endpoint", "outcome"],
            registry=self.registry,
        )
        self.crm_seconds = Histogram(
            f"{PREFIX}_crm_request_duration_seconds",
            "Time to RetailCRM's whole answer, by API endpoint",
            ["endpoint"],
            buckets=REQUEST_BUCKETS,
            registry=self.registry,
        )
        self._sources: dict[str, StatsSource] = {}
        self.registry.register(_ServiceCollector(self))

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        """One HTTP request served: ``route`` is its template, never the raw path."""
        self.http_requests.labels(route, method, str(status)).inc()
        self.http_seconds.labels(route, method).observe(seconds)

    def observe_crm(self, path: str, status: int | None, error: str | None, seconds: float) -> None:
        """Count and time one request to RetailCRM (``CrmHttp``'s observer)."""
        endpoint = crm_endpoint(path)
        outcome = error or ("error" if status is None else _crm_outcome(status))
        self.crm_requests.labels(endpoint, outcome).inc()
        self.crm_seconds.labels(endpoint).observe(seconds)

    def add_source(self, name: str, source: StatsSource) -> None:
        if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
            raise ValueError(f"stats source name {name!r} must be snake_case")
        self._sources[name] = source

    def remove_source(self, name: str) -> None:
        self._sources.pop(name, None)

    def snapshot(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, source in list(self._sources.items()):
            try:
                out[name] = dict(source())
            except Exception as exc:  # a broken source must not take /stats down
                logger.warning("stats.source_failed source=%s error=%s", name, type(exc).__name__)
                out[name] = {"error": type(exc).__name__}
        return out

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
