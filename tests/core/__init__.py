"""Tests of the relay core: streams, wire, tokens, keys, settings."""
