"""Speak a relay turn from an arq job.

    from workers.adapters import arq_adapter

    class WorkerSettings:
        functions = [arq_adapter.speak_turn]
        on_startup = arq_adapter.startup      # or call it from your own on_startup
        on_shutdown = arq_adapter.shutdown
        max_tries = 5

    await pool.enqueue_job("speak_turn", "conv-42", pcm, 16000, wait_s=60)

The relay side is configured from the environment (REDIS_URL, RELAY_KEY_PREFIX, ...), which may
name another Redis than arq's. Delivery: arq runs a job again when it raises ``Retry`` (done here
on Redis errors, up to ``max_tries``) and when its worker died, once the job's in-progress marker
expires after ``job_timeout``. Every run submits the same turn id (``arq-<job id>``), so the turn
is queued and played once however often the job runs.
"""

from __future__ import annotations

from typing import Any

from arq import Retry
from redis.exceptions import RedisError

from workers.adapters.common import RelayTurns

CTX_KEY = "relay_turns"


async def startup(ctx: dict[str, Any]) -> None:
    ctx[CTX_KEY] = RelayTurns.from_env()


async def shutdown(ctx: dict[str, Any]) -> None:
    turns = ctx.pop(CTX_KEY, None)
    if turns is not None:
        await turns.close()


async def speak_turn(ctx: dict[str, Any], conversation_id: str, audio: bytes | str,
                     sample_rate: int, avatar_id: str | None = None,
                     deadline_s: float | None = None, wait_s: float = 0.0) -> dict[str, Any]:
    """Submit the turn (with ``wait_s``, also wait for its end); the result says how it went."""
    turns: RelayTurns | None = ctx.get(CTX_KEY)
    if turns is None:
        raise RuntimeError("add workers.adapters.arq_adapter.startup to the worker's on_startup")
    try:
        outcome = await turns.speak(system="arq", job_id=ctx["job_id"],
                                    conversation_id=conversation_id, audio=audio,
                                    sample_rate=sample_rate, avatar_id=avatar_id,
                                    deadline_s=deadline_s, wait_s=wait_s)
    except (RedisError, OSError) as exc:
        raise Retry(defer=min(30, 2 ** int(ctx.get("job_try", 1)))) from exc
    return outcome.as_dict()
