"""Tests of the `relay` command."""
