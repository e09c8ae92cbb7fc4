"""The job queue: backends submit turns (``submit``), producer workers run them (``worker``).

Importing this package gives the submit side only, which needs a Redis client and nothing of the
Spatius SDK: ``from workers.queue import TurnQueue``.
"""

from workers.errors import MalformedJob, QueueError, QueueFull, SendPending
from workers.queue.input import StreamedInput
from workers.queue.jobs import JOB_FIELD, KIND_CLIP, KIND_STREAM, TurnJob, decode_job
from workers.queue.submit import (
    SUBMIT_ALREADY_DONE,
    SUBMIT_ALREADY_QUEUED,
    SUBMIT_QUEUED,
    Submitted,
    TurnQueue,
)

__all__ = [
    "JOB_FIELD",
    "KIND_CLIP",
    "KIND_STREAM",
    "SUBMIT_ALREADY_DONE",
    "SUBMIT_ALREADY_QUEUED",
    "SUBMIT_QUEUED",
    "MalformedJob",
    "QueueError",
    "QueueFull",
    "SendPending",
    "StreamedInput",
    "Submitted",
    "TurnJob",
    "TurnQueue",
    "decode_job",
]
