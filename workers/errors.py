"""Errors of the producer side, shared by the producer, its frames pipe and the worker."""

from __future__ import annotations

from relay.errors import RelayError


class ProducerError(RelayError):
    """A turn could not be produced (Redis failed under it, or it could not even start)."""


class ProducerClosed(ProducerError):
    """The producer is closed or closing and takes no new turns."""


class AttemptFenced(ProducerError):
    """A queued turn's attempt may no longer run: it was dropped, or another attempt took over."""


class QueueError(RelayError):
    """A turn could not be queued."""


class QueueFull(QueueError):
    """``max_jobs`` turns are already waiting; try again later."""


class MalformedJob(QueueError):
    """A job entry that does not decode as a job of a known version."""


class SendPending(QueueError):
    """A streamed turn's earlier chunk is not known to be written: ``flush()`` it first."""
