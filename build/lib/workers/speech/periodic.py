"""``Periodic``: one owned background task that runs an action on an interval."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from contextlib import suppress

import structlog
from redis.exceptions import RedisError

log = structlog.get_logger(__name__)


class Periodic:
    """One owned background task that awaits ``action`` every ``interval_s``.

    Redis errors are logged and the loop goes on (the next round retries); anything else is a bug
    and ends the task, which is logged at once and re-raised by ``close``.
    """

    def __init__(self, name: str, interval_s: float, action: Callable[[], Awaitable[None]]) -> None:
        self._name = name
        self._interval_s = interval_s
        self._action = action
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=self._name)
            self._task.add_done_callback(self._report)

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                await self._action()
            except (RedisError, OSError) as exc:
                log.warning("periodic_task_redis_error", task=self._name, error=str(exc))

    def _report(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("periodic_task_failed", task=self._name, exc_info=task.exception())
