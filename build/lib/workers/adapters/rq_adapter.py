"""Speak a relay turn from an RQ job.

    from redis import Redis
    from rq import Queue
    from workers.adapters.rq_adapter import enqueue_turn

    enqueue_turn(Queue("turns", connection=Redis.from_url(...)), "conv-42", pcm, 16000)

RQ runs a job once unless it has a ``Retry``: ``enqueue_turn`` gives it ``Retry(max=retries)``,
which also covers a worker that died mid-job (RQ re-enqueues an abandoned job that has retries
left once its execution expires after ``job_timeout``; without retries it would only land in the
FailedJobRegistry). Every run submits the same turn id (``rq-<job id>``), so the turn plays once.
"""

from __future__ import annotations

from typing import Any

from rq import Queue, Retry, get_current_job
from rq.job import Job

from workers.adapters.common import RelayTurns, run_sync


async def _speak(job_id: str, **request: Any) -> dict[str, Any]:
    async with RelayTurns.from_env() as turns:
        outcome = await turns.speak(system="rq", job_id=job_id, **request)
    return outcome.as_dict()


def speak_turn(conversation_id: str, audio: bytes | str, sample_rate: int,
               avatar_id: str | None = None, deadline_s: float | None = None,
               wait_s: float = 0.0) -> dict[str, Any]:
    """The RQ job function (runs in the RQ worker)."""
    job = get_current_job()
    if job is None:
        raise RuntimeError("speak_turn runs inside an RQ worker; use enqueue_turn")
    return run_sync(_speak(job.id, conversation_id=conversation_id, audio=audio,
                           sample_rate=sample_rate, avatar_id=avatar_id, deadline_s=deadline_s,
                           wait_s=wait_s))


def enqueue_turn(queue: Queue, conversation_id: str, audio: bytes, sample_rate: int, *,
                 avatar_id: str | None = None, deadline_s: float | None = None,
                 wait_s: float = 0.0, retries: int = 3, job_timeout: int = 300) -> Job:
    """Enqueue ``speak_turn`` with retries; ``job_timeout`` must exceed ``wait_s``."""
    if wait_s >= job_timeout:
        raise ValueError("job_timeout must be longer than wait_s")
    return queue.enqueue(speak_turn, conversation_id, audio, sample_rate, avatar_id=avatar_id,
                         deadline_s=deadline_s, wait_s=wait_s, job_timeout=job_timeout,
                         retry=Retry(max=retries, interval=[1, 5, 15]))
