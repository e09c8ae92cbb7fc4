"""Tests of the edge: delivery, resume, refusals, resilience."""
