"""Producer side of the relay: turns spoken into conversation streams with Spatius motion.

``Producer`` runs turns in-process for any asyncio backend; ``TurnQueue`` hands turns to
``ProducerWorker`` processes (``relay producer``) through Redis from any backend process.
"""

from workers.leases import ConversationBusy
from workers.producer import Attempt, Producer, ProducerClosed, ProducerError, Turn, TurnResult
from workers.queue import MalformedJob, QueueError, QueueFull, StreamedInput, TurnQueue
from workers.worker import ProducerWorker

__all__ = [
    "Attempt",
    "ConversationBusy",
    "MalformedJob",
    "Producer",
    "ProducerClosed",
    "ProducerError",
    "ProducerWorker",
    "QueueError",
    "QueueFull",
    "StreamedInput",
    "Turn",
    "TurnQueue",
    "TurnResult",
]
