"""Background tasks that renew leases and close sessions survive a bug in one round."""

from __future__ import annotations

import asyncio

from workers.speech.periodic import Periodic


async def test_a_failing_round_is_logged_and_the_task_goes_on() -> None:
    calls = []

    async def action() -> None:
        calls.append(len(calls))
        if len(calls) == 1:
            raise ValueError("a bug in the first round")

    task = Periodic("test-periodic", 0.01, action)
    task.start()
    for _ in range(200):
        if len(calls) >= 3:
            break
        await asyncio.sleep(0.01)
    await task.close()
    assert len(calls) >= 3 and task.failures == 1
