"""The bare-loop baseline reader: one blocking multi-stream XREAD loop that decodes, nothing else.

Run as ``python -m relay.dev.bench.bare``. Config: ``redis_url``, ``streams`` (key -> conversation
id),
``count``, ``block_ms``. It reads every stream from the start with redis-py's ``XREAD BLOCK``
(``COUNT`` per stream, as the edge's hub does), decodes each entry's msgpack body and records it
in the same ``Tally`` the WebSocket clients use. No relay logic: no sessions, queues, sockets or
framing. Events: ``ready``; ``report`` after ``finish`` (targets, deadline) as for clients.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import msgpack
import redis.asyncio as redis

from relay.dev.bench.child import ParentLink
from relay.dev.bench.tally import Receipts, Tally, parse_id


class BareReader:
    def __init__(self, config: dict[str, Any]) -> None:
        self._cfg = config
        self._client = redis.Redis.from_url(config["redis_url"], socket_timeout=None)
        streams: dict[str, str] = config["streams"]
        self._positions: dict[bytes, bytes] = {k.encode(): b"0-0" for k in streams}
        self._tallies = {k.encode(): Tally(c) for k, c in streams.items()}
        self.receipts = Receipts()
        self.reads = 0
        self._targets: dict[bytes, tuple[int, int]] | None = None
        self._deadline = 0.0

    async def run(self, link: ParentLink) -> None:
        await self._client.ping()
        link.emit("ready")
        command_task = asyncio.create_task(link.receive())
        while not self._finished():
            if command_task.done() and self._targets is None:
                self._set_targets(command_task.result() or {})
            await self._read_once()
        link.emit("report", receipts=self.receipts.to_json(), reads=self.reads,
                  tallies=[t.to_json() for t in self._tallies.values()])
        command_task.cancel()
        await self._client.aclose()

    def _set_targets(self, command: dict[str, Any]) -> None:
        targets = command.get("targets", {})
        by_conv = {t.conversation: key for key, t in self._tallies.items()}
        self._targets = {by_conv[c]: parse_id(last) for c, last in targets.items()
                         if last and c in by_conv}
        self._deadline = time.monotonic() + float(command.get("deadline_s", 10))

    def _finished(self) -> bool:
        if self._targets is None:
            return False
        if time.monotonic() > self._deadline:
            return True
        return all(self._tallies[k].last >= v for k, v in self._targets.items())

    async def _read_once(self) -> None:
        block = int(self._cfg.get("block_ms", 1000))
        if self._targets is not None:
            block = 100  # finishing: notice reached targets promptly
        reply = await self._client.xread(self._positions, count=int(self._cfg.get("count", 512)),
                                         block=block)
        self.reads += 1
        receipts, unpack = self.receipts, msgpack.unpackb
        for key, entries in reply or ():
            tally = self._tallies[key]
            for raw_id, fields in entries:
                body = unpack(fields[b"d"])
                tally.on_entry(raw_id.decode(), body, time.time() * 1000, receipts)
            if entries:
                self._positions[key] = entries[-1][0]


async def _main() -> None:
    link = await ParentLink.open()
    config = await link.receive()
    if config is None:
        return
    await BareReader(config).run(link)


if __name__ == "__main__":
    asyncio.run(_main())
