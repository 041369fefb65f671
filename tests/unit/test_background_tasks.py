"""``BackgroundTasks``: tasks owned by one object; ``log_unexpected``: traces without messages."""

from __future__ import annotations

import asyncio
import logging
import math

import anyio
import pytest

from vochi_crm_client import BackgroundTasks, StateError, log_unexpected
from vochi_crm_client.testing import settle

SECRET = "postgresql://user:hunter2-secret@db/prod"


async def test_closing_cancels_the_tasks_and_waits_for_them() -> None:
    tasks = BackgroundTasks("test")
    tasks.open()
    unwound: list[str] = []

    async def forever(name: str) -> None:
        try:
            await anyio.sleep_forever()
        finally:
            unwound.append(name)

    tasks.start(forever, "a", name="a")
    tasks.start(forever, "b", name="b")
    await settle()
    assert tasks.running == 2
    assert await tasks.close() is False
    assert sorted(unwound) == ["a", "b"]
    assert tasks.running == 0


async def test_a_grace_period_lets_tasks_finish_on_their_own() -> None:
    tasks = BackgroundTasks("test")
    tasks.open()
    go = asyncio.Event()
    finished: list[bool] = []

    async def flush() -> None:
        await go.wait()
        finished.append(True)

    tasks.start(flush, name="flush")
    await settle()
    go.set()
    assert await tasks.close(grace=math.inf) is True
    assert finished == [True]


async def test_tasks_are_refused_before_opening_and_after_closing() -> None:
    tasks = BackgroundTasks("test")

    async def nothing() -> None:
        return None

    with pytest.raises(StateError):
        tasks.start(nothing, name="early")
    tasks.open()
    await tasks.close()
    with pytest.raises(StateError):
        tasks.start(nothing, name="late")
    with pytest.raises(StateError):
        tasks.open()


async def test_a_failing_task_is_logged_with_its_trace_and_spares_its_siblings(
    caplog: pytest.LogCaptureFixture,
) -> None:
    tasks = BackgroundTasks("test", logger=logging.getLogger("tests.owner"))
    tasks.open()

    async def broken() -> None:
        raise RuntimeError(f"cannot reach {SECRET}")

    tasks.start(broken, name="broken")
    tasks.start(anyio.sleep_forever, name="sibling")
    with caplog.at_level(logging.ERROR):
        await settle()
    assert tasks.failures == 1
    assert tasks.running == 1  # the sibling runs on
    await tasks.close()
    record = next(r for r in caplog.records if r.name == "tests.owner")
    text = record.getMessage()
    assert text.startswith("task.failed owner=test task=broken error=RuntimeError")
    assert "Traceback (most recent call last)" in text
    assert "in broken" in text
    assert "hunter2" not in caplog.text


async def test_a_cancelled_closer_still_waits_for_every_task_then_is_cancelled() -> None:
    tasks = BackgroundTasks("test")
    tasks.open()
    unwound = asyncio.Event()

    async def slow_to_stop() -> None:
        try:
            await anyio.sleep_forever()
        finally:
            with anyio.CancelScope(shield=True):
                await asyncio.sleep(0)
                await asyncio.sleep(0)
            unwound.set()

    tasks.start(slow_to_stop, name="slow")
    await settle()
    with anyio.CancelScope() as scope:
        scope.cancel()
        await tasks.close(grace=math.inf)
    assert scope.cancelled_caught
    assert unwound.is_set()
    assert tasks.running == 0


def test_unexpected_errors_are_logged_with_frames_and_causes_but_no_messages(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def connect() -> None:
        raise OSError(f"refused by {SECRET}")

    try:
        try:
            connect()
        except OSError as exc:
            raise ValueError(f"bad DSN {SECRET}") from exc
    except ValueError as exc:
        with caplog.at_level(logging.ERROR):
            log_unexpected(logging.getLogger("tests.loop"), "loop.error", exc, attempt=3)
    text = caplog.records[0].getMessage()
    assert text.splitlines()[0] == "loop.error attempt=3 error=ValueError"
    assert "in connect" in text
    assert "builtins.OSError (message withheld)" in text
    assert "The above exception was the direct cause of:" in text
    assert "builtins.ValueError (message withheld)" in text
    assert "hunter2" not in caplog.text
