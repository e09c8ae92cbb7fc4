"""One blocking read loop per Redis node that serves every conversation an edge's clients watch.

The hub keeps, per conversation, the stream position it has read up to and the set of attached
client sessions. Per Redis node (one on a single server, one per primary on a cluster) a single
``XREAD BLOCK`` over all of that node's streams (plus the edge's wake stream on that node) brings
new entries; each entry is turned into a client frame once and offered to every attached session,
so N clients of one conversation on one edge cost one read. Offering never awaits: each session
has its own bounded queue and writer task, so a slow client cannot hold up the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Any, Protocol

import redis.asyncio as redis
import structlog
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from relay import streams, wire
from relay.edge.framing import binary_frame
from relay.edge.metrics import DeliveryTally, EdgeMetrics
from relay.edge.routing import Router, Shard, TopologyChanged
from relay.keys import Keys
from relay.streams import parse_id

log = structlog.get_logger(__name__)

_WAKE_MAXLEN = 16
# The witness key outlives its edge by at most this; a long-running read loop renews it well
# before (a lapse would only cost one history check that finds nothing).
_WITNESS_TTL_MS = 24 * 3_600_000
_WITNESS_RENEW_S = 3600.0
_FIRST_BACKOFF_S = 0.05
_MAX_BACKOFF_S = 2.0
_READ_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)


class Subscriber(Protocol):
    def offer(self, entry_id: tuple[int, int], frame: bytes) -> None: ...

    def on_unavailable(self) -> None: ...

    def on_history_lost(self) -> None: ...


@dataclass
class _Subscription:
    stream_key: str
    bucket: int
    position: str
    subscribers: set[Subscriber] = field(default_factory=set)


class Hub:
    def __init__(self, router: Router, keys: Keys, *, block_ms: int, count: int,
                 unavailable_after_s: float = 10.0, metrics: EdgeMetrics | None = None) -> None:
        self._router = router
        self._metrics = metrics if metrics is not None else EdgeMetrics()
        self._keys = keys
        self._block_ms = block_ms
        self._count = count
        self._unavailable_after_s = unavailable_after_s
        self._subs: dict[str, _Subscription] = {}
        self._by_stream: dict[bytes, _Subscription] = {}
        self._shards: list[Shard] = []
        self._shard_ready: dict[str, bool] = {}
        self._read_since: dict[str, float] = {}  # loop time each shard's current read began
        self._stopping = False
        self.reads = 0
        self.delivered = 0

    @property
    def conversations(self) -> int:
        return len(self._subs)

    @property
    def ready(self) -> bool:
        return bool(self._shard_ready) and all(self._shard_ready.values())

    @property
    def ready_loops(self) -> int:
        return sum(self._shard_ready.values())

    def stalled(self, now: float) -> list[str]:
        """Shards whose current read has run far past its block time: a hung connection, or a
        loop that stopped without saying so (readiness fails on them)."""
        bound = self._block_ms / 1000 * 2 + 5.0
        return [name for name, since in self._read_since.items() if now - since > bound]

    @property
    def redis_connections(self) -> int:
        """Connections the blocking reads hold (one per shard), for the scale-out measurements."""
        return len(self._shards)

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
            sub = _Subscription(stream_key=key, bucket=self._keys.bucket(conversation_id),
                                position=tip)
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

    async def wake(self, conversation_id: str) -> None:
        """Make the blocking read of the conversation's shard return and include the stream now."""
        shard = self._router.shard_for(self._keys.bucket(conversation_id), self._shards)
        if shard is not None:
            await shard.client.xadd(shard.wake_key, {b"w": b"1"}, maxlen=_WAKE_MAXLEN,
                                    approximate=False)

    async def stop(self, task: asyncio.Task[None], timeout_s: float = 2.0) -> None:
        """End the read loops by waking them (a cancelled blocking read can leave a connection
        mid-reply), then cancel whatever has not finished in time."""
        self._stopping = True
        for shard in self._shards:
            with contextlib.suppress(redis.RedisError, OSError, asyncio.TimeoutError):
                await asyncio.wait_for(
                    shard.client.xadd(shard.wake_key, {b"w": b"1"}, maxlen=_WAKE_MAXLEN), timeout_s)
        done, _ = await asyncio.wait({task}, timeout=timeout_s)
        if not done:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._router.close()

    async def run(self) -> None:
        """Discover the nodes, read each in its own loop; start over when the topology changes."""
        backoff = _FIRST_BACKOFF_S
        while not self._stopping:
            try:
                self._metrics.topology_refreshes.inc()
                self._shards = await self._router.refresh()
                self._shard_ready = {s.name: False for s in self._shards}
                await self._read_shards()
                backoff = _FIRST_BACKOFF_S
            except (TopologyChanged, RedisClusterException, redis.RedisError, OSError) as exc:
                # Any Redis failure here is an outage or a failover: discovery itself raises
                # RedisClusterException (not a RedisError) while every cluster node is down.
                self._shard_ready, self._read_since = {}, {}
                self._metrics.read_failed(exc)
                log.warning("hub_topology_refresh", reason=str(exc), retry_in_s=round(backoff, 2))
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF_S)

    async def _read_shards(self) -> None:
        tasks = [asyncio.create_task(self._read_loop(shard), name=f"hub-{shard.name}")
                 for shard in self._shards]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()  # a loop only ends early by raising: surface it
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _read_loop(self, shard: Shard) -> None:
        loop = asyncio.get_running_loop()
        backoff = _FIRST_BACKOFF_S
        down_since: float | None = None
        wake_position = await self._wake_tip(shard)
        verify = True  # a new loop (start, failover, topology change): check what it missed
        checked_at = loop.time()
        while not self._stopping:
            try:
                if verify or loop.time() - checked_at > _WITNESS_RENEW_S:
                    wake_position = await self._verify_history(shard, wake_position)
                    verify, checked_at = False, loop.time()
                wake_position = await self._read_once(shard, wake_position)
            except ResponseError as exc:
                if _is_redirect(exc):
                    raise TopologyChanged(str(exc)) from exc
                raise
            except _READ_ERRORS as exc:
                verify = True  # Redis may come back without what it had (restart, failover)
                self._shard_ready[shard.name] = False
                self._read_since.pop(shard.name, None)
                self._metrics.read_failed(exc)
                down_since = down_since or loop.time()
                log.warning("hub_read_failed", node=shard.name, error=str(exc),
                            retry_in_s=round(backoff, 2))
                if loop.time() - down_since > self._unavailable_after_s:
                    # Redis has been gone too long: send clients elsewhere rather than keep them
                    # half-alive, and look again at the topology (a replica may have taken over).
                    self._release(shard)
                    raise TopologyChanged(f"node {shard.name} unavailable") from exc
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF_S)
                continue
            if down_since is not None:
                log.info("hub_read_recovered", node=shard.name)
            down_since, backoff = None, _FIRST_BACKOFF_S

    async def _wake_tip(self, shard: Shard) -> str:
        # The hub's clients only ever XREAD for the hub: keep replies as Redis sent them.
        shard.client.set_response_callback("XREAD", _raw_reply)
        last = await shard.client.xrevrange(shard.wake_key, count=1)
        return last[0][0].decode() if last else "0-0"

    async def _read_once(self, shard: Shard, wake_position: str) -> str:
        keys: list[str | bytes] = [shard.wake_key]
        ids = [wake_position]
        for sub in self._subs.values():
            if shard.covers(sub.bucket):
                keys.append(sub.stream_key)
                ids.append(sub.position)
        self._shard_ready[shard.name] = True
        self._read_since[shard.name] = asyncio.get_running_loop().time()
        # The witness key, checked right after the read returns (same connection, pipelined),
        # says whether Redis kept its data meanwhile: when it is gone (Redis restarted empty,
        # was flushed, or a replica without it took over, with or without a connection error)
        # nothing this read returned is fanned out before every subscription's history is
        # checked; the next read returns it again for the streams that kept theirs.
        pipe = shard.client.pipeline(transaction=False)
        pipe.execute_command(
            "XREAD", "COUNT", self._count, "BLOCK", self._block_ms, "STREAMS", *keys, *ids)
        pipe.exists(self._keys.edge_witness(shard.wake_key))
        reply, witnessed = await pipe.execute()
        self.reads += 1
        if not witnessed:
            return await self._verify_history(shard, wake_position)
        tally, read = DeliveryTally(), 0
        for key, entries in reply or ():
            if key == shard.wake_key_bytes:
                wake_position = entries[-1][0].decode()
                continue
            target = self._by_stream.get(key)
            if target is not None and entries:
                read += len(entries)
                self._fan_out(target, entries, tally)
        self._metrics.delivered_live(tally, read)
        return wake_position

    def _fan_out(self, sub: _Subscription, entries: list[list[Any]], tally: DeliveryTally) -> None:
        # Entries arrive raw ([id, [field, value]]): the hub's clients skip redis-py's dict per
        # entry (see _raw_reply). A subscription dropped and re-created while this read was in
        # flight starts at a newer tip; entries it already covers are skipped so nobody gets one
        # twice.
        current = parse_id(sub.position)
        for raw_id, fields in entries:
            entry_id = raw_id.decode()
            parsed = parse_id(entry_id)
            if parsed <= current or len(fields) < 2:
                continue
            frame = binary_frame(wire.delivery(entry_id, fields[1]))
            for subscriber in tuple(sub.subscribers):
                subscriber.offer(parsed, frame)
            self.delivered += len(sub.subscribers)
            tally.add(fields[1], len(sub.subscribers), len(frame))
            if not tally.oldest_ms or parsed[0] < tally.oldest_ms:
                tally.oldest_ms = parsed[0]
            current = parsed
            sub.position = entry_id

    async def _verify_history(self, shard: Shard, wake_position: str) -> str:
        """Tell the clients of every stream on the shard that lost entries after the position
        the hub had read (Redis restarted empty, a failover that lost writes): they are closed
        with 1012 ``history_lost`` and their resume gets ``recovered: false``, exactly as a
        client that reconnects with a lost ``last_id``. Returns the wake position to read from
        (the wake stream is recreated when it was gone)."""
        lost = 0
        for conversation_id, sub in list(self._subs.items()):
            if not shard.covers(sub.bucket) or sub.position == "0-0":
                continue  # nothing of it was delivered from here yet: nothing can be missing
            info = await streams.stream_info(shard.client, self._keys, conversation_id)
            if info.can_resume_after(sub.position):
                continue
            lost += 1
            log.warning("stream_history_lost", conversation_id=conversation_id,
                        position=sub.position, stream_last_id=info.last_id,
                        clients=len(sub.subscribers))
            for subscriber in tuple(sub.subscribers):
                subscriber.on_history_lost()
            # Whoever attaches from now on joined the stream as it is now: read on from its tip.
            sub.position = info.last_id
        if not await shard.client.exists(shard.wake_key):
            wake_position = "0-0"  # the wake stream went too: read it from its new start
        # Set only after the check: a loss from here on is the next read's to notice.
        await shard.client.set(self._keys.edge_witness(shard.wake_key), b"1",
                               px=_WITNESS_TTL_MS)
        if lost:
            log.info("hub_history_checked", node=shard.name, streams_lost=lost)
        return wake_position

    def _release(self, shard: Shard) -> None:
        for sub in list(self._subs.values()):
            if shard.covers(sub.bucket):
                for subscriber in tuple(sub.subscribers):
                    subscriber.on_unavailable()


def _raw_reply(response: Any, **options: Any) -> Any:
    return response


def _is_redirect(exc: ResponseError) -> bool:
    text = str(exc)
    return text.startswith(("MOVED", "ASK", "CLUSTERDOWN", "TRYAGAIN"))
