"""The latency bench's clients: one WebSocket per conversation, in a process of their own.

Run as ``python -m relay.dev.bench.latency_clients``. Config: ``urls``, one edge WebSocket URL
per conversation. Once every connection is welcomed it says ``ready``; from then on, each time a
turn ends for its client (``turn_end`` or ``interrupt``) it emits one ``turn`` event with what
that client saw of it: when its first ``audio`` and first ``frames`` arrived (``time.monotonic``,
which on Linux is CLOCK_MONOTONIC, one clock for every process of the machine, so the parent
compares it with its own submit times), the entry ids' milliseconds (the Redis clock), the
Motion Server request id of the first frames, the end status, and whether frames came before any
audio of the turn (protocol guarantee 2). It stops when the parent closes its stdin.

Why a process apart from the submitter: a real backend and its users' apps never share an event
loop, and in one loop every round's first audio messages were received between the backend's own
submits, each side's figures carrying the other's work.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import msgpack

from relay import wire
from relay.dev.bench.child import ParentLink
from relay.dev.motion_sim import proto

_READY_TIMEOUT_S = 60.0


class Watcher:
    """One client connection: each turn's first audio and first frames, reported at its end."""

    def __init__(self, url: str, link: ParentLink) -> None:
        self._url = url
        self._link = link
        self._turns: dict[str, dict[str, Any]] = {}
        self.welcomed = asyncio.Event()

    async def run(self, http: aiohttp.ClientSession) -> None:
        async with http.ws_connect(self._url, max_msg_size=0) as ws:
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.BINARY:
                    self._on(time.monotonic(), msgpack.unpackb(msg.data))

    def _on(self, now: float, body: dict[str, Any]) -> None:
        kind = body.get("kind")
        if kind == wire.WELCOME:
            self.welcomed.set()
            return
        turn_id = body.get("turn")
        if not isinstance(turn_id, str):
            return
        seen = self._turns.setdefault(turn_id, {"first_audio": None, "first_frames": None,
                                                "violation": False})
        if kind == wire.AUDIO and seen["first_audio"] is None:
            seen["first_audio"] = now
            seen["appended_ms"] = entry_ms(body)
        elif kind == wire.FRAMES and seen["first_frames"] is None:
            seen["first_frames"] = now
            seen["frames_appended_ms"] = entry_ms(body)
            seen["req_id"] = request_id(body)
            seen["violation"] = seen["first_audio"] is None
        elif kind in (wire.TURN_END, wire.INTERRUPT):
            del self._turns[turn_id]
            self._link.emit("turn", turn=turn_id, status=body.get("status", "interrupt"),
                            ended=now, **seen)


def request_id(body: dict[str, Any]) -> str | None:
    """The req_id inside a frames message's animation envelope (None if unreadable). Read with
    the simulator's schema, not ``workers.speech.session.request_id_of``: that one imports the
    SDK, which the bench's processes keep out."""
    try:
        envelope = proto.Message.FromString(bytes(body.get("data", b"")))
    except (TypeError, ValueError):  # protobuf's DecodeError is a ValueError
        return None
    req_id: str = envelope.server_response_animation.req_id
    return req_id or None


def entry_ms(body: dict[str, Any]) -> int:
    """When Redis appended the delivered entry: its id's milliseconds (of the Redis clock)."""
    return int(str(body.get("id", "0")).partition("-")[0])


async def _main() -> None:
    link = await ParentLink.open()
    config = await link.receive()
    if config is None:
        return
    watchers = [Watcher(url, link) for url in config["urls"]]
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        tasks = [asyncio.create_task(w.run(http)) for w in watchers]
        try:
            async with asyncio.timeout(_READY_TIMEOUT_S):
                await asyncio.gather(*(w.welcomed.wait() for w in watchers))
            link.emit("ready")
            await link.receive()  # until the parent closes stdin
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


if __name__ == "__main__":
    asyncio.run(_main())
