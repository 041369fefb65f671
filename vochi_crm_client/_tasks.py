"""Background tasks with an owner, and secret-free stack traces of unexpected errors.

Public names (re-exported by ``vochi_crm_client``)::

    BackgroundTasks(name: str, *, logger: logging.Logger | None = None)
        tasks.open()                               # in the owner's __aenter__ (a running loop)
        tasks.start(func, *args, name=...) -> None # run ``await func(*args)`` in the background
        tasks.cancel()                             # ask every task to stop now (synchronous)
        await tasks.close(grace=0.0) -> bool       # wait up to ``grace``, cancel, wait for all
        tasks.running -> int;  tasks.is_open -> bool;  tasks.failures -> int

    log_unexpected(logger, event, exc, **fields)  # ERROR with the frames, never the message

Every object of the library and of the service that runs tasks in the background owns them
through one ``BackgroundTasks``: opened when the object opens, closed when it closes, so no task
outlives its owner and nobody has to keep a side set of tasks. The tasks are plain asyncio tasks
of the running loop, not children of the caller's cancel scope: cancelling the task that opened
the owner does not cancel them (the owner decides when they stop, which is what lets a client
keep flushing while its caller is being cancelled), and owners may be closed in any order.

A task that raises is logged by ``log_unexpected`` and counted in ``failures``; it does not take
its siblings or its owner down. Cancellation is never swallowed: ``close`` re-raises a
cancellation that arrived while it waited, once every task has finished.
"""

from __future__ import annotations

import asyncio
import logging
import math
import traceback
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from ._exceptions import StateError

__all__ = ["BackgroundTasks", "log_unexpected"]

_logger = logging.getLogger(__name__)


def log_unexpected(
    logger: logging.Logger, event: str, exc: BaseException, **fields: object
) -> None:
    """Log ``exc`` at ERROR as ``event key=value ... error=Class`` followed by its stack trace.

    Exception messages are left out of the trace, and so are those of its causes: the messages
    of driver and HTTP errors can carry DSNs, URLs or keys, while the frames (file, line,
    function, source line) cannot.
    """
    names = " ".join(f"{key}=%s" for key in fields)
    template = f"{event} {names} error=%s\n%s" if names else f"{event} error=%s\n%s"
    logger.error(template, *fields.values(), type(exc).__name__, secret_free_traceback(exc))


def secret_free_traceback(exc: BaseException) -> str:
    """The stack trace of ``exc`` and its causes, with exception classes but no messages."""
    chain: list[tuple[BaseException, str]] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    link = ""
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        chain.append((current, link))
        if current.__cause__ is not None:
            current, link = current.__cause__, "The above exception was the direct cause of:"
        elif current.__context__ is not None and not current.__suppress_context__:
            current, link = current.__context__, "During handling of the above exception:"
        else:
            current = None
    lines: list[str] = []
    # Oldest first, as Python prints chains; each link says how it led to the next one.
    for error, link in reversed(chain):
        lines.append("Traceback (most recent call last):\n")
        lines.extend(traceback.format_tb(error.__traceback__))
        kind = type(error)
        lines.append(f"{kind.__module__}.{kind.__qualname__} (message withheld)\n")
        if link:
            lines.append(f"\n{link}\n\n")
    return "".join(lines).rstrip("\n")


class BackgroundTasks:
    """The background tasks of one owner; see the module docstring."""

    def __init__(self, name: str, *, logger: logging.Logger | None = None) -> None:
        self.name = name
        self._logger = logger or _logger
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._open = False
        self.failures = 0

    def __repr__(self) -> str:
        state = "open" if self._open else "closed" if self._loop is not None else "unopened"
        return f"<BackgroundTasks {self.name!r} {state} running={len(self._tasks)}>"

    @property
    def is_open(self) -> bool:
        return self._open

    @property
    def running(self) -> int:
        return len(self._tasks)

    def open(self) -> None:
        """Accept tasks from now on; call it from the owner's ``__aenter__``."""
        if self._loop is not None:
            raise StateError(f"background tasks of {self.name} can be opened only once")
        # Kept so that synchronous code outside the loop's current task can start tasks too.
        self._loop = asyncio.get_running_loop()
        self._open = True

    def start(self, func: Callable[..., Awaitable[Any]], *args: Any, name: str) -> None:
        """Run ``await func(*args)`` as a task of this owner; StateError unless open."""
        if not self._open or self._loop is None:
            raise StateError(f"background tasks of {self.name} are not open")
        task = self._loop.create_task(self._guarded(func, args, name), name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _guarded(self, func: Callable[..., Awaitable[Any]], args: Any, name: str) -> None:
        try:
            await func(*args)
        except Exception as exc:  # cancellation (a BaseException) passes through
            self.failures += 1
            log_unexpected(self._logger, "task.failed", exc, owner=self.name, task=name)

    def cancel(self) -> None:
        """Ask every running task to stop; they unwind at their next await."""
        for task in list(self._tasks):
            task.cancel()

    def _unfinished(self) -> set[asyncio.Task[None]]:
        # Done tasks leave the set in a callback that may not have run yet.
        return {task for task in self._tasks if not task.done()}

    async def close(self, *, grace: float = 0.0) -> bool:
        """Refuse new tasks, give the running ones ``grace`` seconds (``math.inf``: as long as
        they take) to finish on their own, cancel the rest and wait until every task is done.

        Returns True when every task finished within the grace period.
        """
        self._open = False
        cancelled: BaseException | None = None
        finished = True
        try:
            if self._tasks and grace > 0:
                timeout = None if math.isinf(grace) else grace
                await asyncio.wait(set(self._tasks), timeout=timeout)
        except asyncio.CancelledError as exc:
            cancelled = exc
        if self._unfinished():
            finished = False
            self.cancel()
        # Shielded: a cancelled caller must not leave cancelled tasks behind, unfinished.
        with anyio.CancelScope(shield=True):
            while pending := self._unfinished():
                try:
                    await asyncio.wait(pending)
                except asyncio.CancelledError as exc:
                    cancelled = exc
        if cancelled is not None:
            raise cancelled
        return finished
