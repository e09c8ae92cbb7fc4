"""python-socketio with its Redis manager, for comparison only: the peer a team would reach for.

Run as ``python -m relay.dev.bench.sio`` (server). Config: ``redis_url``, ``channel``. An
``AsyncServer`` (aiohttp mode) whose client manager is ``AsyncRedisManager``: the bench writer
emits each entry to the conversation's room through Redis pub/sub, and this server forwards it
to the room's WebSocket clients. A client joins its room by passing ``{"conversation": id}`` as
its connect auth. Events: ``ready`` with the port it listens on.

``SioConnection`` is the client side, used by ``relay.dev.bench.clients`` with
``protocol: socketio``: one ``socketio.AsyncClient`` per conversation, recording every entry in
the conversation's ``Tally``. socket.io has no resume: a lost connection loses what was sent
meanwhile, which the tally then shows.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import msgpack
from aiohttp import web

from relay.dev.bench.child import ParentLink
from relay.dev.bench.tally import Receipts, Tally, parse_id


async def _main() -> None:
    import socketio

    link = await ParentLink.open()
    config: dict[str, Any] | None = await link.receive()
    if config is None:
        return
    manager = socketio.AsyncRedisManager(config["redis_url"], channel=config["channel"])
    server = socketio.AsyncServer(async_mode="aiohttp", client_manager=manager,
                                  cors_allowed_origins="*")

    async def connect(sid: str, environ: dict[str, Any], auth: dict[str, Any] | None) -> None:
        await server.enter_room(sid, (auth or {}).get("conversation", ""))

    server.on("connect", connect)
    app = web.Application()
    server.attach(app)
    runner = web.AppRunner(app, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, backlog=4096)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]  # noqa: SLF001
    link.emit("ready", port=port)
    await link.receive()  # until the parent closes stdin
    await runner.cleanup()


class SioConnection:
    """One socket.io client watching one conversation (the bench clients' ``Connection`` API)."""

    def __init__(self, url: str, conversation: str, receipts: Receipts) -> None:
        self._url = url
        self.tally = Tally(conversation)
        self._receipts = receipts
        self.welcomed = asyncio.Event()
        self.done = asyncio.Event()
        self.target: tuple[int, int] | None = None
        self.reconnects = 0
        self.errors = 0
        self.close_codes: list[int | None] = []
        self._stopping = False

    def finish_at(self, target: str | None) -> None:
        self.target = parse_id(target) if target else (0, 0)
        if self.tally.last >= self.target:
            self.done.set()

    def stop(self) -> None:
        self._stopping = True
        self.done.set()

    def _on_message(self, data: dict[str, Any]) -> None:
        now = time.time() * 1000
        entry_id = str(data["id"])
        self.tally.on_entry(entry_id, msgpack.unpackb(data["d"]), now, self._receipts)
        if self.target is not None and self.tally.last >= self.target:
            self.done.set()

    async def run(self, session: Any, gate: asyncio.Semaphore) -> None:
        import socketio

        client = socketio.AsyncClient(reconnection=False, http_session=session)
        client.on("m", self._on_message)
        try:
            async with gate:
                await client.connect(self._url, auth={"conversation": self.tally.conversation},
                                     transports=["websocket"], wait_timeout=30)
            self.welcomed.set()
            await self.done.wait()
        except (socketio.exceptions.ConnectionError, OSError, TimeoutError):
            self.errors += 1
        finally:
            await client.disconnect()


if __name__ == "__main__":
    asyncio.run(_main())
