"""Thin adapters that let arq jobs, Celery tasks and RQ jobs speak turns through the relay.

Each one submits the turn into the built-in queue under a turn id derived from the job's own id,
and may wait for the turn to end. The relay's producers then speak it with the built-in queue's
guarantees (crash recovery, per-conversation order, exactly-once playback, the session cap);
the other queue system only has to deliver a short, idempotent submit at least once. See
docs/operations.md, "Running turns from arq, Celery or RQ".
"""
