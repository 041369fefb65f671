"""The bounded, domain-aware event buffer of one target: synchronous, O(1) per event.

Each enterprise has its own FIFO, and batches are cut round-robin across enterprises, so one
enterprise's flood adds at most one batch of delay to another's events. Popups (dial, bridge) are
worth something only while the call rings: they expire after ``popup_ttl`` and, once late, are
superseded by the call's hangup. Late means: the hangup is queued while the target is
``degraded`` (failing, breaker not closed), or the popup already failed an attempt or waited
``supersede_after`` seconds. A popup merely lingering a few ms on a healthy target (a very short
call) is still sent: the CRM shows the card and closes it. History (hangup, download) is kept
until the bound; at the bound popups go first (from the enterprise holding most of them), then
the oldest history of the enterprise holding most events. Every drop is counted by reason.

Entries leave the FIFOs lazily: a dropped entry is only marked, and skipped when reached (or
compacted away when dead entries pile up), which keeps every operation O(1) amortised.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from vochi_crm_client._event import CallEvent

__all__ = ["DROP_REASONS", "Counters", "Entry", "TargetBuffer"]

logger = logging.getLogger(__name__)

DROP_REASONS = ("expired", "superseded", "overflow", "rejected", "shutdown")

_QUEUED, _HELD, _DONE = 0, 1, 2
_COMPACT_SLACK = 64


class Entry:
    """One event on its way to one target."""

    __slots__ = ("doomed", "enqueued_at", "event", "failed", "in_popups", "state")

    def __init__(self, event: CallEvent, enqueued_at: float) -> None:
        self.event = event
        self.enqueued_at = enqueued_at
        self.state = _QUEUED
        self.in_popups = False
        self.failed = False  # an attempt to send it failed (it was requeued)
        # Set on a held (in-flight) popup whose hangup arrived: dropped before the next attempt.
        self.doomed: str | None = None

    @property
    def done(self) -> bool:
        return self.state == _DONE


@dataclass(slots=True)
class Counters:
    """Monotonic counters of one target."""

    enqueued: int = 0
    sent: int = 0
    delivered: int = 0
    duplicates: int = 0
    rejected: int = 0
    retried: int = 0
    requeued: int = 0
    batches: int = 0
    batches_failed: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))


class _EnterpriseQueue:
    __slots__ = ("fifo", "in_ring", "live", "live_popups", "popups")

    def __init__(self) -> None:
        self.fifo: deque[Entry] = deque()
        self.popups: deque[Entry] = deque()  # popup entries in arrival order, for expiry/eviction
        self.live = 0
        self.live_popups = 0
        self.in_ring = False


class TargetBuffer:
    """Queued and in-flight events of one target, bounded at ``max_queue``."""

    def __init__(
        self,
        *,
        max_queue: int,
        popup_ttl: float,
        supersede_after: float = 1.0,
        counters: Counters | None = None,
    ) -> None:
        self.max_queue = max_queue
        self.popup_ttl = popup_ttl
        self.supersede_after = supersede_after
        self.degraded = False  # set by the sender while the target fails
        self.counters = counters or Counters()
        self._queues: dict[str, _EnterpriseQueue] = {}
        self._ring: deque[str] = deque()
        self._calls: dict[tuple[str, str], list[Entry]] = {}  # queued/held popups per call
        self._queued = 0
        self._held = 0
        self._popups = 0  # queued popups, all enterprises

    @property
    def queued(self) -> int:
        """Events waiting to be sent."""
        return self._queued

    @property
    def held(self) -> int:
        """Events taken into a batch and not settled yet."""
        return self._held

    def queued_by_enterprise(self) -> dict[str, int]:
        return {ent: q.live for ent, q in self._queues.items() if q.live}

    def put(self, event: CallEvent, now: float) -> None:
        ent = event.enterprise_number
        queue = self._queues.get(ent)
        if queue is None:
            queue = self._queues[ent] = _EnterpriseQueue()
        entry = Entry(event, now)
        if event.is_popup:
            self._calls.setdefault((ent, event.call_unique_id), []).append(entry)
            queue.popups.append(entry)
            entry.in_popups = True
            queue.live_popups += 1
            self._popups += 1
        elif self._calls:
            self._supersede(ent, event.call_unique_id, now)
        queue.fifo.append(entry)
        queue.live += 1
        self._queued += 1
        self.counters.enqueued += 1
        if not queue.in_ring:
            queue.in_ring = True
            self._ring.append(ent)
        if queue.popups:
            self._expire_queue(queue, now)
        if len(queue.fifo) > 2 * queue.live + _COMPACT_SLACK:
            self._compact(queue)
        while self._queued + self._held > self.max_queue and self._evict_one(queue):
            pass

    def take(self, now: float, max_events: int, max_bytes: int) -> list[Entry]:
        """Cut the next batch: round-robin over enterprises, skipping dead and stale entries."""
        batch: list[Entry] = []
        size = 16  # the envelope {"events":[...]}
        while self._ring and len(batch) < max_events:
            quantum = max(1, -(-(max_events - len(batch)) // len(self._ring)))
            ent = self._ring.popleft()
            queue = self._queues[ent]
            taken = 0
            full = False
            while queue.fifo and taken < quantum and len(batch) < max_events:
                entry = queue.fifo[0]
                if entry.state != _QUEUED:
                    queue.fifo.popleft()
                    continue
                if self._stale(entry, now):
                    queue.fifo.popleft()
                    self._drop_queued(queue, entry, "expired")
                    continue
                cost = len(entry.event.wire) + 1
                if batch and size + cost > max_bytes:
                    full = True
                    break
                queue.fifo.popleft()
                self._hold(queue, entry)
                batch.append(entry)
                size += cost
                taken += 1
            self._reinsert(ent, queue)
            if full:
                break
        return batch

    def requeue(self, entries: Iterable[Entry], *, front: bool = True) -> None:
        """Put held entries back at the front (or the back) of their queues, in order."""
        ordered = reversed(list(entries)) if front else list(entries)
        for entry in ordered:
            if entry.state != _HELD:
                continue
            if entry.doomed is not None:
                self.drop_held(entry, entry.doomed)
                continue
            ent = entry.event.enterprise_number
            queue = self._queues.get(ent)
            if queue is None:
                queue = self._queues[ent] = _EnterpriseQueue()
            entry.state = _QUEUED
            entry.failed = True
            self._held -= 1
            self._queued += 1
            queue.live += 1
            (queue.fifo.appendleft if front else queue.fifo.append)(entry)
            if entry.event.is_popup:
                queue.live_popups += 1
                self._popups += 1
                if not entry.in_popups:
                    entry.in_popups = True
                    (queue.popups.appendleft if front else queue.popups.append)(entry)
            self.counters.requeued += 1
            if not queue.in_ring:
                queue.in_ring = True
                (self._ring.appendleft if front else self._ring.append)(ent)
        while self._queued + self._held > self.max_queue and self._evict_one(None):
            pass

    def settle(self, entries: Iterable[Entry]) -> None:
        """Held entries that reached the target (delivered or rejected): forget them."""
        for entry in entries:
            if entry.state == _HELD:
                self._held -= 1
                self._finish(entry)

    def drop_held(self, entry: Entry, reason: str) -> None:
        if entry.state == _HELD:
            self._held -= 1
            self._finish(entry)
            self.counters.dropped[reason] += 1

    def stale_or_doomed(self, entry: Entry, now: float) -> str | None:
        """Why a held entry should not be sent again, if it should not."""
        if entry.doomed is not None:
            return entry.doomed
        return "expired" if self._stale(entry, now) else None

    def expire(self, now: float) -> None:
        """Drop every queued popup older than ``popup_ttl`` (run while the target is down)."""
        for queue in self._queues.values():
            self._expire_queue(queue, now)

    def abandon(self, reason: str) -> int:
        """Drop every queued and held event (shutdown past the deadline); returns how many."""
        dropped = self._queued + self._held
        self.counters.dropped[reason] += dropped
        for queue in self._queues.values():
            for entry in queue.fifo:
                entry.state = _DONE
        self._queues.clear()
        self._ring.clear()
        self._calls.clear()
        self._queued = self._held = self._popups = 0
        return dropped

    def _stale(self, entry: Entry, now: float) -> bool:
        return entry.event.is_popup and now - entry.enqueued_at >= self.popup_ttl

    def _supersede(self, ent: str, uid: str, now: float) -> None:
        popups = self._calls.get((ent, uid))
        if not popups:
            return
        late = [
            e
            for e in popups
            if self.degraded or e.failed or now - e.enqueued_at >= self.supersede_after
        ]
        if len(late) == len(popups):
            del self._calls[(ent, uid)]
        else:
            popups[:] = [e for e in popups if e not in late]
        for entry in late:
            if entry.state == _QUEUED:
                self._drop_queued(self._queues[ent], entry, "superseded", unindex=False)
            elif entry.state == _HELD:
                entry.doomed = "superseded"

    def _hold(self, queue: _EnterpriseQueue, entry: Entry) -> None:
        entry.state = _HELD
        queue.live -= 1
        if entry.event.is_popup:
            queue.live_popups -= 1
            self._popups -= 1
        self._queued -= 1
        self._held += 1

    def _reinsert(self, ent: str, queue: _EnterpriseQueue) -> None:
        if queue.live:
            self._ring.append(ent)
            return
        queue.in_ring = False
        for entry in queue.popups:
            entry.in_popups = False
        del self._queues[ent]

    def _drop_queued(
        self, queue: _EnterpriseQueue, entry: Entry, reason: str, *, unindex: bool = True
    ) -> None:
        queue.live -= 1
        if entry.event.is_popup:
            queue.live_popups -= 1
            self._popups -= 1
        self._queued -= 1
        self._finish(entry, unindex=unindex)
        self.counters.dropped[reason] += 1

    def _finish(self, entry: Entry, *, unindex: bool = True) -> None:
        entry.state = _DONE
        if unindex and entry.event.is_popup:
            key = (entry.event.enterprise_number, entry.event.call_unique_id)
            siblings = self._calls.get(key)
            if siblings is not None:
                if entry in siblings:
                    siblings.remove(entry)
                if not siblings:
                    del self._calls[key]

    def _expire_queue(self, queue: _EnterpriseQueue, now: float) -> None:
        popups = queue.popups
        while popups:
            entry = popups[0]
            if entry.state != _QUEUED:
                popups.popleft()
                entry.in_popups = False
            elif self._stale(entry, now):
                popups.popleft()
                entry.in_popups = False
                self._drop_queued(queue, entry, "expired")
            else:
                break

    def _compact(self, queue: _EnterpriseQueue) -> None:
        queue.fifo = deque(e for e in queue.fifo if e.state == _QUEUED)
        kept = deque(e for e in queue.popups if e.state == _QUEUED)
        for entry in queue.popups:
            entry.in_popups = False
        for entry in kept:
            entry.in_popups = True
        queue.popups = kept

    def _evict_one(self, hint: _EnterpriseQueue | None) -> bool:
        """Drop one queued event at the bound: a popup while any is queued, else history.

        The victim is the enterprise that is putting (``hint``) when it holds a popup, or for
        history at least its fair share of the buffer (a flood pays for itself in O(1));
        otherwise the enterprise holding the most popups, or the most events.
        """
        if not self._queued:
            return False
        if self._popups:
            if hint is None or not hint.live_popups:
                hint = max(self._queues.values(), key=lambda q: q.live_popups)
            while hint.popups:
                entry = hint.popups.popleft()
                entry.in_popups = False
                if entry.state == _QUEUED:
                    self._drop_queued(hint, entry, "overflow")
                    return True
        if hint is None or hint.live * len(self._queues) < self._queued:
            hint = max(self._queues.values(), key=lambda q: q.live)
        while hint.fifo:
            entry = hint.fifo.popleft()
            if entry.state == _QUEUED:
                self._drop_queued(hint, entry, "overflow")
                return True
        return False
