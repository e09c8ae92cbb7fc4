"""Tests of the dev tooling: the Motion Server simulator, the bench."""
