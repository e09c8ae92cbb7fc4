"""Clients of the edge protocol (docs/protocol.md): the Python client; the web client lives in
``web/`` beside it."""

from relay.client.python import RelayClient, RelayClientError

__all__ = ["RelayClient", "RelayClientError"]
