"""Producer side of the relay: turns spoken into conversation streams with Spatius motion.

``workers.speech`` speaks a turn through the SDK (``Producer`` runs turns in-process for any asyncio
backend); ``workers.queue`` hands turns from any backend process to ``ProducerWorker`` processes
(``relay producer``) through Redis; ``workers.adapters`` plug that queue into arq, Celery and RQ.

Names are resolved lazily, so ``from workers.queue import TurnQueue`` loads neither the Spatius SDK
nor the producer.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Attempt": "workers.speech.producer",
    "ConversationBusy": "workers.speech.leases",
    "FirstAudio": "workers.speech.turn",
    "MalformedJob": "workers.errors",
    "Producer": "workers.speech.producer",
    "ProducerClosed": "workers.errors",
    "ProducerError": "workers.errors",
    "ProducerWorker": "workers.queue.worker",
    "QueueError": "workers.errors",
    "QueueFull": "workers.errors",
    "StreamedInput": "workers.queue.input",
    "Turn": "workers.speech.turn",
    "TurnQueue": "workers.queue.submit",
    "TurnResult": "workers.speech.turn",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'workers' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
