"""Clients of the edge protocol (docs/protocol.md): the Python client, the AvatarKit state machine
both clients follow, and the web client in ``web/`` beside them."""

from relay.client.avatarkit import AvatarController, AvatarKitAdapter, StreamPosition
from relay.client.python import RelayClient, RelayClientError

__all__ = ["AvatarController", "AvatarKitAdapter", "RelayClient", "RelayClientError",
           "StreamPosition"]
