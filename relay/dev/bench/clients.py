"""Bench WebSocket clients: many connections in one process, each watching one conversation.

Run as ``python -m relay.dev.bench.clients``. Config: ``edge`` (ws base URL), ``conversations``,
``secret`` (to mint tokens), ``connect_concurrency``. Each connection follows the client rules of
docs/protocol.md (binary msgpack, resume with ``last_id`` on a resumable close) and records every
stream message in its conversation's ``Tally`` with the receive time. Events: ``ready`` once
every connection got its welcome; then, after the parent's ``finish`` command (the last id
appended per conversation and a deadline), ``report``.
"""

from __future__ import annotations

import asyncio
import resource
import time
from typing import Any

import aiohttp
import msgpack

from relay import wire
from relay.dev.bench.child import ParentLink
from relay.dev.bench.tally import Receipts, Tally, parse_id
from relay.tokens import mint_token

_BACKOFF_S = (0.05, 0.1, 0.2, 0.5, 1.0)


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


class Connection:
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

    async def run(self, session: aiohttp.ClientSession, gate: asyncio.Semaphore) -> None:
        attempt = 0
        while not self._stopping:
            url = self._url
            if self.tally.last_id:
                url += f"&last_id={self.tally.last_id}"
            try:
                async with gate:
                    ws = await session.ws_connect(url, max_msg_size=0, autoping=True)
                async with ws:
                    await self._read(ws)
                self.close_codes.append(ws.close_code)
                if ws.close_code in wire.CloseCode.FATAL:
                    return
            except (aiohttp.ClientError, OSError, TimeoutError):
                self.errors += 1
            if self._stopping or self.done.is_set():
                return
            self.reconnects += 1
            await asyncio.sleep(_BACKOFF_S[min(attempt, len(_BACKOFF_S) - 1)])
            attempt += 1

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        tally, receipts = self.tally, self._receipts
        async for msg in ws:
            if msg.type != aiohttp.WSMsgType.BINARY:
                continue
            now = time.time() * 1000
            body = msgpack.unpackb(msg.data)
            entry_id = body.get("id")
            if entry_id is None:
                if body.get("kind") == wire.WELCOME:
                    self.welcomed.set()
                continue
            tally.on_entry(entry_id, body, now, receipts)
            if self.target is not None and tally.last >= self.target:
                self.done.set()
            if self.done.is_set():
                return


class ClientProcess:
    def __init__(self, config: dict[str, Any]) -> None:
        self._cfg = config
        self.receipts = Receipts()
        base = config["edge"].rstrip("/")
        secret = config["secret"]
        self.connections: list[Any] = []
        if config.get("protocol") == "socketio":
            from relay.dev.bench.sio import SioConnection

            http = base.replace("ws://", "http://")
            self.connections = [SioConnection(http, c, self.receipts)
                                for c in config["conversations"]]
        else:
            self.connections = [
                Connection(f"{base}/v1/conversations/{c}/ws?token={mint_token(secret, c)}", c,
                           self.receipts)
                for c in config["conversations"]
            ]

    async def run(self, link: ParentLink) -> None:
        raise_nofile()
        connector = aiohttp.TCPConnector(limit=0)
        gate = asyncio.Semaphore(int(self._cfg.get("connect_concurrency", 32)))
        async with aiohttp.ClientSession(connector=connector) as session:
            tasks = [asyncio.create_task(c.run(session, gate)) for c in self.connections]
            welcomed = await self._wait_welcomed(float(self._cfg.get("connect_timeout_s", 60)))
            link.emit("ready", connected=welcomed, wanted=len(self.connections))
            command = await link.receive() or {"targets": {}, "deadline_s": 0}
            await self._finish(command)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        link.emit("report", **self._report())

    async def _wait_welcomed(self, timeout_s: float) -> int:
        waits = [asyncio.create_task(c.welcomed.wait()) for c in self.connections]
        _, pending = await asyncio.wait(waits, timeout=timeout_s)
        for task in pending:
            task.cancel()
        return sum(c.welcomed.is_set() for c in self.connections)

    async def _finish(self, command: dict[str, Any]) -> None:
        targets: dict[str, str | None] = command.get("targets", {})
        for conn in self.connections:
            conn.finish_at(targets.get(conn.tally.conversation))
        waits = [asyncio.create_task(c.done.wait()) for c in self.connections]
        _, pending = await asyncio.wait(waits, timeout=float(command.get("deadline_s", 10)))
        for task in pending:
            task.cancel()
        for conn in self.connections:
            conn.stop()

    def _report(self) -> dict[str, Any]:
        codes: dict[str, int] = {}
        for conn in self.connections:
            for code in conn.close_codes:
                codes[str(code)] = codes.get(str(code), 0) + 1
        return {
            "receipts": self.receipts.to_json(),
            "tallies": [c.tally.to_json() for c in self.connections],
            "reconnects": sum(c.reconnects for c in self.connections),
            "connect_errors": sum(c.errors for c in self.connections),
            "close_codes": codes,
        }


async def _main() -> None:
    link = await ParentLink.open()
    config = await link.receive()
    if config is None:
        return
    await ClientProcess(config).run(link)


if __name__ == "__main__":
    asyncio.run(_main())
