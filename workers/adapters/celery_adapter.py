"""Speak a relay turn from a Celery task.

    from celery import Celery
    from workers.adapters.celery_adapter import register

    app = Celery("backend", broker="redis://...")
    speak_turn = register(app)
    speak_turn.delay("conv-42", pcm, 16000, wait_s=60)

Celery acknowledges a task when a worker *receives* it, unless ``acks_late``: a worker killed
mid-task then loses it. The task registered here sets ``acks_late=True`` and
``reject_on_worker_lost=True`` so a task whose worker died is delivered again, and retries on
Redis errors. With the Redis broker, an unacknowledged task comes back only after the broker's
``visibility_timeout`` (1 hour by default): set ``broker_transport_options={"visibility_timeout":
...}`` above your longest ``wait_s``, or the task may run twice meanwhile (harmless here: every
run submits the same turn id, ``celery-<task id>``, so the turn plays once). Audio may be bytes
(kombu's JSON carries them, about twice their size) or a base64 str; prefer the msgpack
serializer for large clips.
"""

from __future__ import annotations

from typing import Any

from celery import Celery, Task
from redis.exceptions import RedisError

from workers.adapters.common import RelayTurns, run_sync

TASK_NAME = "relay.speak_turn"


async def _speak(job_id: str, **request: Any) -> dict[str, Any]:
    async with RelayTurns.from_env() as turns:
        outcome = await turns.speak(system="celery", job_id=job_id, **request)
    return outcome.as_dict()


def register(app: Celery, *, name: str = TASK_NAME, max_retries: int = 5) -> Task:
    """Register the task on ``app``; returns it (call ``.delay`` / ``.apply_async``)."""

    # Celery ships no type hints: its decorator is untyped, the task function itself is typed.
    @app.task(name=name, bind=True, acks_late=True, reject_on_worker_lost=True,
              autoretry_for=(RedisError, OSError), retry_backoff=True,
              retry_kwargs={"max_retries": max_retries})  # type: ignore[untyped-decorator]
    def speak_turn(self: Task, conversation_id: str, audio: bytes | str, sample_rate: int,
                   avatar_id: str | None = None, deadline_s: float | None = None,
                   wait_s: float = 0.0) -> dict[str, Any]:
        return run_sync(_speak(self.request.id, conversation_id=conversation_id, audio=audio,
                               sample_rate=sample_rate, avatar_id=avatar_id,
                               deadline_s=deadline_s, wait_s=wait_s))

    return speak_turn
