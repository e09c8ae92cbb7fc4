"""``Periodic``: one owned background task that runs an action on an interval."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from contextlib import suppress

import structlog
from redis.exceptions import RedisClusterException, RedisError

log = structlog.get_logger(__name__)


class Periodic:
    """One owned background task that awaits ``action`` every ``interval_s``.

    Redis errors are logged and the loop goes on (the next round retries). Anything else is a
    bug: it is logged at once with its traceback and the loop goes on too, because these tasks
    renew leases and close idle sessions; one that ended would leave the process half-dead
    (running, but losing its conversations to other producers). ``failures`` counts them.
    """

    def __init__(self, name: str, interval_s: float, action: Callable[[], Awaitable[None]]) -> None:
        self._name = name
        self._interval_s = interval_s
        self._action = action
        self._task: asyncio.Task[None] | None = None
        self.failures = 0

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
            except (RedisError, RedisClusterException, OSError) as exc:
                # RedisClusterException: no cluster node reachable (it is not a RedisError).
                log.warning("periodic_task_redis_error", task=self._name, error=str(exc))
            except Exception:
                self.failures += 1
                log.exception("periodic_task_failed", task=self._name,
                              restart_in_s=self._interval_s)

    def _report(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("periodic_task_failed", task=self._name, exc_info=task.exception())
