"""Prometheus metrics with a per-app registry, and the pluggable sources of ``/stats``.

``Metrics`` is built by ``create_app`` (``app.state.metrics``, also ``runtime.metrics``):

- ``metrics.registry``: the app's own ``CollectorRegistry``; other components create their
  collectors with ``registry=metrics.registry`` (never the global default registry).
- ``metrics.http_requests`` (labels ``route``, ``method``, ``status``) and
  ``metrics.retailcrm_calls`` (labels ``method``, ``outcome``) are shared counters.
- ``metrics.add_source(name, fn)``: ``fn() -> dict`` becomes ``/stats[name]``, and every numeric
  leaf is exported as the gauge ``retailcrm_service_<name>_<path>``. Sources must not hold secrets.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)

StatsSource = Callable[[], Mapping[str, Any]]
_NAME_CHARS = re.compile(r"[^a-zA-Z0-9_]")


class _StatsCollector(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[GaugeMetricFamily]:
        for name, values in self._metrics.snapshot().items():
            yield from _gauges(f"retailcrm_service_{name}", values)


def _gauges(prefix: str, values: Any) -> Iterator[GaugeMetricFamily]:
    if isinstance(values, (bool, int, float)):
        yield GaugeMetricFamily(_NAME_CHARS.sub("_", prefix), prefix, value=float(values))
    elif isinstance(values, Mapping):
        for key, value in values.items():
            yield from _gauges(f"{prefix}_{key}", value)


class Metrics:
    """The app's registry, shared counters and ``/stats`` sources."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.http_requests = Counter(
            "retailcrm_service_http_requests",
            "HTTP requests served",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.retailcrm_calls = Counter(
            "retailcrm_service_retailcrm_calls",
            "Calls to the RetailCRM API",
            ["method", "outcome"],
            registry=self.registry,
        )
        self._sources: dict[str, StatsSource] = {}
        self.registry.register(_StatsCollector(self))

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
