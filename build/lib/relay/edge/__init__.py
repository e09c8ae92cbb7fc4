"""Edge nodes: WebSocket delivery of conversation streams to client apps."""

from relay.edge.app import create_app

__all__ = ["create_app"]
