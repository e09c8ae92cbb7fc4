"""Tests of the producer side: speaking turns, the job queue, adapters."""
