"""One blocking read loop per edge that serves every conversation its clients watch.

The hub keeps, per conversation, the stream position it has read up to and the set of attached
client sessions. A single ``XREAD BLOCK`` over all those streams (plus the edge's wake stream)
brings new entries; each entry is turned into a client frame once and offered to every attached
session, so N clients of one conversation on one edge cost one read. Offering never awaits: each
session has its own bounded queue and writer task, so a slow client cannot hold up the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Protocol

import redis.asyncio as redis
import structlog
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from relay import wire
from relay.keys import Keys
from relay.streams import parse_id

log = structlog.get_logger(__name__)

_WAKE_MAXLEN = 16
_MAX_BACKOFF_S = 2.0


class Subscriber(Protocol):
    def offer(self, entry_id: str, frame: bytes) -> None: ...

    def on_unavailable(self) -> None: ...


@dataclass
class _Subscription:
    stream_key: str
    position: str
    subscribers: set[Subscriber] = field(default_factory=set)


class Hub:
    def __init__(self, client: redis.Redis, keys: Keys, *, node_id: str, block_ms: int,
                 count: int, unavailable_after_s: float = 10.0) -> None:
        self._client = client
        self._keys = keys
        self._wake_key = keys.edge_wake(node_id)
        self._wake_position = "$"
        self._block_ms = block_ms
        self._count = count
        self._unavailable_after_s = unavailable_after_s
        self._subs: dict[str, _Subscription] = {}
        self._by_stream: dict[bytes, _Subscription] = {}
        self.ready = asyncio.Event()
        self._stopping = False
        self.reads = 0
        self.delivered = 0

    @property
    def conversations(self) -> int:
        return len(self._subs)

    def attach(self, conversation_id: str, subscriber: Subscriber, tip: str) -> tuple[str, bool]:
        """Attach and return (position, is_new): entries after it reach the subscriber live.

        ``tip`` is the stream's last id as the caller just read it; a new subscription starts
        there. Runs without awaiting, so no fan-out can slip between choosing the position and
        joining the subscriber set.
        """
        sub = self._subs.get(conversation_id)
        created = sub is None
        if sub is None:
            key = self._keys.stream(conversation_id)
            sub = _Subscription(stream_key=key, position=tip)
            self._subs[conversation_id] = sub
            self._by_stream[key.encode()] = sub
        sub.subscribers.add(subscriber)
        return sub.position, created

    def detach(self, conversation_id: str, subscriber: Subscriber) -> None:
        sub = self._subs.get(conversation_id)
        if sub is None:
            return
        sub.subscribers.discard(subscriber)
        if not sub.subscribers:
            del self._subs[conversation_id]
            del self._by_stream[sub.stream_key.encode()]

    async def wake(self) -> None:
        """Make the blocking read return so it picks up a new subscription now."""
        await self._client.xadd(self._wake_key, {b"w": b"1"}, maxlen=_WAKE_MAXLEN, approximate=False)

    async def stop(self, task: asyncio.Task[None], timeout_s: float = 2.0) -> None:
        """End the read loop by waking it (a cancelled blocking read can leave the connection
        mid-reply), then cancel it if it has not finished in time."""
        self._stopping = True
        with contextlib.suppress(redis.RedisError, OSError):
            await asyncio.wait_for(self.wake(), timeout_s)
        done, _ = await asyncio.wait({task}, timeout=timeout_s)
        if not done:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def run(self) -> None:
        backoff = 0.05
        down_since: float | None = None
        loop = asyncio.get_running_loop()
        while not self._stopping:
            try:
                await self._read_once()
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                self.ready.clear()
                down_since = down_since or loop.time()
                log.warning("hub_read_failed", error=str(exc), retry_in_s=round(backoff, 2))
                if loop.time() - down_since > self._unavailable_after_s:
                    self._release_all()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF_S)
                continue
            if down_since is not None:
                log.info("hub_read_recovered")
            down_since = None
            backoff = 0.05
            self.ready.set()

    async def _read_once(self) -> None:
        if self._wake_position == "$":
            self._wake_position = await self._wake_tip()
        streams: dict[str | bytes, str] = {self._wake_key: self._wake_position}
        for sub in self._subs.values():
            streams[sub.stream_key] = sub.position
        self.ready.set()
        reply = await self._client.xread(streams, count=self._count, block=self._block_ms)
        self.reads += 1
        for key, entries in reply or ():
            if key == self._wake_key.encode():
                self._wake_position = entries[-1][0].decode()
                continue
            sub = self._by_stream.get(key)
            if sub is not None and entries:
                self._fan_out(sub, entries)

    async def _wake_tip(self) -> str:
        last = await self._client.xrevrange(self._wake_key, count=1)
        return last[0][0].decode() if last else "0-0"

    def _fan_out(self, sub: _Subscription, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> None:
        # A subscription dropped and re-created while this read was in flight starts at a newer
        # tip; entries it already covers are skipped so nobody gets one twice.
        current = parse_id(sub.position)
        for raw_id, fields in entries:
            entry_id = raw_id.decode()
            parsed = parse_id(entry_id)
            if parsed <= current:
                continue
            frame = wire.delivery(entry_id, fields[b"d"])
            for subscriber in tuple(sub.subscribers):
                subscriber.offer(entry_id, frame)
            self.delivered += len(sub.subscribers)
            current = parsed
            sub.position = entry_id

    def _release_all(self) -> None:
        """Redis has been gone too long: send clients elsewhere rather than keep them half-alive."""
        for sub in list(self._subs.values()):
            for subscriber in tuple(sub.subscribers):
                subscriber.on_unavailable()
