"""From records to figures: latencies, loss, recovery, per-second series.

Times are wall-clock seconds on one machine: the host simulator stamps each webhook when it
sends it (``time.time()``), the RetailCRM stand-in stamps each call event and each uploaded call
when it arrives (``receivedTs``, from the same clock). A popup or a history that never arrived
counts as an infinitely late one in the percentiles (and as missing), never as absent.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from _peak_calls.calls import PopupKey, Template

INF = math.inf
OK = 200


def quantile(values: Sequence[float], q: float) -> float:
    """The q-quantile (nearest rank) of already sorted values; NaN when there are none."""
    if not values:
        return math.nan
    return values[min(len(values) - 1, int(q * len(values)))]


class Receipts:
    """What RetailCRM received, first arrival of each popup and each call."""

    def __init__(self) -> None:
        self.popups: dict[tuple[str, str, tuple[str, ...]], float] = {}
        self.calls: dict[str, float] = {}
        self.rate_limited = 0
        self.requests: dict[str, int] = {}

    def add(self, reply: dict[str, Any]) -> int:
        """Merge one ``/_bench/receipts`` answer; returns how many new things arrived."""
        new = 0
        for uid, kind, codes, ts in reply["popups"]:
            key = (str(uid), str(kind), tuple(codes))
            if key not in self.popups:
                self.popups[key] = float(ts)
                new += 1
        for uid, ts in reply["calls"]:
            if uid is not None and uid not in self.calls:
                self.calls[str(uid)] = float(ts)
                new += 1
        self.rate_limited = int(reply["rate_limited"])
        self.requests = dict(reply["requests"])
        return new


@dataclass
class Calls:
    """The simulator's records of one run: calls and their webhooks."""

    calls: list[list[Any]]  # [uid, enterprise, template, start]
    hooks: list[list[Any]]  # [call, step, sent, ack_ms, status, queued]
    templates: list[Template]
    host_cpu_pct: float = 0.0  # the simulator's own CPU, % of one core
    host_lag_p99_ms: float = 0.0  # how late its webhooks left, against their schedule

    def of(self, phases: Iterable[str]) -> Calls:
        """The records of the calls whose UniqueId starts with one of ``phases``."""
        wanted = set(phases)
        keep = {i for i, c in enumerate(self.calls) if c[0].split(".", 1)[0] in wanted}
        renumber = {old: new for new, old in enumerate(sorted(keep))}
        return Calls(
            calls=[self.calls[i] for i in sorted(keep)],
            hooks=[[renumber[h[0]], *h[1:]] for h in self.hooks if h[0] in keep],
            templates=self.templates,
            host_cpu_pct=self.host_cpu_pct,
            host_lag_p99_ms=self.host_lag_p99_ms,
        )

    def expected_history(self) -> list[str]:
        """UniqueIds whose history must arrive: the hangup was acknowledged (queued)."""
        out = []
        for call_no, step_no, _, _, status, queued in self.hooks:
            uid, _, tpl, _ = self.calls[call_no]
            if status == OK and queued and self.templates[tpl].steps[step_no].history:
                out.append(uid)
        return out


@dataclass
class Figures:
    calls: int = 0
    webhooks: int = 0
    host_errors: int = 0
    ack_ms: list[float] = field(default_factory=list)
    acks: list[tuple[float, float]] = field(default_factory=list)  # (sent, ack s)
    popups: list[tuple[float, float]] = field(default_factory=list)  # (sent, latency s)
    history: list[tuple[float, float]] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        acks = sorted(self.ack_ms)
        popup = sorted(lat for _, lat in self.popups)
        history = sorted(lat for _, lat in self.history)
        return {
            "calls": self.calls,
            "webhooks": self.webhooks,
            "host_errors": self.host_errors,
            "ack_p50_ms": quantile(acks, 0.5),
            "ack_p99_ms": quantile(acks, 0.99),
            "popups_expected": len(popup),
            "popups_missing": sum(1 for v in popup if v == INF),
            "popup_p50_ms": quantile(popup, 0.5) * 1000,
            "popup_p99_ms": quantile(popup, 0.99) * 1000,
            "history_expected": len(history),
            "history_p50_ms": quantile(history, 0.5) * 1000,
            "history_p99_ms": quantile(history, 0.99) * 1000,
            "lost": len(self.lost),
        }


def measure(records: Calls, receipts: Receipts) -> Figures:
    """Latencies and loss of these calls against what RetailCRM received."""
    figures = Figures(calls=len(records.calls), webhooks=len(records.hooks))
    for call_no, step_no, sent, ack_ms, status, queued in records.hooks:
        if status != OK:
            figures.host_errors += 1
            figures.ack_ms.append(INF)
            figures.acks.append((sent, INF))
            continue
        figures.ack_ms.append(ack_ms)
        figures.acks.append((sent, ack_ms / 1000))
        if not queued:
            continue
        uid, _, tpl, _ = records.calls[call_no]
        template = records.templates[tpl]
        step = template.steps[step_no]
        if step.popup is not None and _expected(step.popup, uid, template, receipts):
            figures.popups.append((sent, _latency(receipts.popups, _key(uid, step.popup), sent)))
        if step.history:
            latency = _latency(receipts.calls, uid, sent)
            figures.history.append((sent, latency))
            if latency == INF:
                figures.lost.append(uid)
    return figures


def _expected(popup: PopupKey, uid: str, template: Template, receipts: Receipts) -> bool:
    """A hangup event is owed only for a card that was opened: when a dial popup of its call
    arrived (the product skips the others, and their dial popups count as missing already)."""
    if popup[0] != "hangup":
        return True
    return any(
        _key(uid, opened) in receipts.popups for opened in template.popups if opened[0] != "hangup"
    )


def _key(uid: str, popup: PopupKey) -> tuple[str, str, tuple[str, ...]]:
    return (uid, popup[0], popup[1])


def _latency(received: dict[Any, float], key: Any, sent: float) -> float:
    at = received.get(key)
    return INF if at is None else max(0.0, at - sent)


def per_second(points: Sequence[tuple[float, float]], origin: float) -> list[tuple[float, float]]:
    """(second since ``origin``, p99 of the points sent in that second), in order."""
    bins: dict[int, list[float]] = {}
    for sent, value in points:
        bins.setdefault(int(sent - origin), []).append(value)
    return [(second, quantile(sorted(v), 0.99)) for second, v in sorted(bins.items())]


def recovery(
    figures: Figures,
    fault_end: float,
    *,
    popup_limit: float,
    ack_limit: float,
    until: float,
) -> dict[str, Any]:
    """How long after ``fault_end`` the service was normal again, or ``None`` if not by ``until``.

    Normal: in every second from then on, the webhooks sent were all acknowledged with p99 within
    ``ack_limit`` and their popups arrived with p99 within ``popup_limit`` (a second is judged by
    what was sent in it). History: the arrival of the last history of a call hung up before
    ``fault_end`` (the backlog of the fault, delivered). ``recovery_s`` is the later of the two.
    """
    bad = {s for s, p99 in per_second(figures.popups, fault_end) if p99 > popup_limit}
    bad |= {s for s, p99 in per_second(figures.acks, fault_end) if p99 > ack_limit}
    bad = {s for s in bad if s >= 0}
    observed = until - fault_end
    normal_s: float | None = float(max(bad) + 1) if bad else 0.0
    if normal_s is not None and normal_s >= observed - 1:
        normal_s = None  # still abnormal in the last observed second
    backlog = [sent + lat for sent, lat in figures.history if sent < fault_end]
    drained: float | None = max([0.0, *(t - fault_end for t in backlog)])
    if drained == INF:
        drained = None
    return {
        "normal_after_s": normal_s,
        "backlog_drained_s": None if drained is None else round(drained, 1),
        "recovery_s": None
        if normal_s is None or drained is None
        else round(max(normal_s, drained), 1),
    }


def finite(value: float) -> float | None:
    """A JSON-safe figure: rounded, ``None`` for infinite or undefined."""
    if value is None or math.isnan(value) or math.isinf(value):
        return None
    return round(value, 2)
