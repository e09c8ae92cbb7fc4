"""Live delivery by push, with the stream as history: what an edge's clients watch, kept in order.

Every append script also pushes what it appended to the conversation's live channel (sharded
pub/sub, ``Keys.live_channel``), naming the id of the entry before the first one it carries
(``relay.streams``). The hub holds one subscriber connection per shard (one on a single server,
one per key bucket on a cluster, each on the node owning the bucket's slot) and subscribes it to
exactly the conversations its clients watch. Per conversation it keeps the position delivered so
far. A push whose predecessor is at or before that position continues it: each entry is turned
into a client frame once and offered to every attached session in one call per push. A push whose
predecessor is after it means entries went by unseen (a subscription just made, a reconnect, a
connection Redis dropped): the conversation switches to *filling*, buffers further pushes, reads
the missing entries from the stream in pages, then applies the buffer, so clients still get every
entry once, in order (docs/architecture.md "Live delivery"). The stream is read only then: to
join, after a reconnect, or to fill a gap. Offering never awaits: each session has its own bounded
queue, so a slow client cannot hold up the hub.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog
from redis._parsers.hiredis import NOT_ENOUGH_DATA, _AsyncHiredisParser
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from relay import streams
from relay.edge.framing import delivery_frame
from relay.edge.metrics import DeliveryTally, EdgeMetrics
from relay.edge.routing import Router, Shard, TopologyChanged
from relay.errors import WireError
from relay.keys import Keys
from relay.redis_conn import RedisClient

log = structlog.get_logger(__name__)

_FIRST_BACKOFF_S = 0.05
_MAX_BACKOFF_S = 2.0
_LINK_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)
# Pushes buffered per conversation while it fills a gap. Overflow policy: drop the buffer and
# read on from the stream (which holds every entry), so nothing is lost, only re-read.
_PENDING_MAX = 256
# Channels per SSUBSCRIBE / SUNSUBSCRIBE command.
_SUBSCRIBE_CHUNK = 256
# History reads in flight at once across the hub (joins, reconnects, gaps).
_FILL_CONCURRENCY = 8
# A silent subscriber connection is taken for dead after this many keepalive intervals.
_SILENT_INTERVALS = 3
# Bytes of a stored entry that tell its kind (for the metrics; see metrics.entry_kind).
_KIND_PREFIX = 20

Batch = list[tuple[tuple[int, int], bytes]]


class Subscriber(Protocol):
    def offer_many(self, batch: Batch) -> None: ...

    def on_unavailable(self) -> None: ...

    def on_behind(self) -> None: ...

    def on_history_lost(self) -> None: ...


@dataclass(eq=False)
class _Subscription:
    conversation_id: str
    channel: bytes
    bucket: int
    position: str  # the last entry delivered (or the tip the subscription started at)
    last: tuple[int, int]
    subscribers: set[Subscriber] = field(default_factory=set)
    # Filling: pushes wait in ``pending`` while the stream is read; set until the first fill
    # after the channel is confirmed subscribed on the current connection has caught up.
    filling: bool = True
    confirmed: asyncio.Event = field(default_factory=asyncio.Event)
    epoch: int = 0  # bumped when the connection serving the channel is lost
    pending: deque[bytes] = field(default_factory=deque)
    overflowed: bool = False
    fill_task: asyncio.Task[None] | None = None
    gone: bool = False  # detached (or sent to resume): a fill in progress stops
    # The next fill first checks that the stream still holds the position (after a lost
    # connection or a gap: Redis may have restarted empty or failed over without it).
    check_history: bool = False

    def advance(self, batch: Batch, position: str) -> None:
        for subscriber in tuple(self.subscribers):
            subscriber.offer_many(batch)
        self.last, self.position = batch[-1][0], position


@dataclass(eq=False)
class _Link:
    """One subscriber connection and what it is (being) subscribed to."""

    shard: Shard
    conn: AbstractConnection
    requested: set[bytes] = field(default_factory=set)  # SSUBSCRIBE sent, no SUNSUBSCRIBE since
    confirmed: set[bytes] = field(default_factory=set)
    leaving: dict[bytes, int] = field(default_factory=dict)  # SUNSUBSCRIBEs not yet confirmed
    to_add: set[bytes] = field(default_factory=set)
    to_drop: set[bytes] = field(default_factory=set)
    dirty: asyncio.Event = field(default_factory=asyncio.Event)
    seen: float = 0.0
    on_up: Callable[[], None] | None = None  # called once, when Redis first answers

    def heard(self, now: float) -> None:
        self.seen = now
        if self.on_up is not None:
            on_up, self.on_up = self.on_up, None
            on_up()

    def live(self, channel: bytes) -> bool:
        return channel in self.confirmed and not self.leaving.get(channel)


class Hub:
    def __init__(self, router: Router, keys: Keys, history: RedisClient, *, ping_ms: int,
                 page: int, fill_max_entries: int, unavailable_after_s: float = 10.0,
                 metrics: EdgeMetrics | None = None) -> None:
        self._router = router
        self._metrics = metrics if metrics is not None else EdgeMetrics()
        # Counted per entry in plain integers, added to the counters once per keepalive tick.
        self._tally = DeliveryTally()
        self._keys = keys
        self._history = history
        self._ping_s = ping_ms / 1000
        self._page = page
        self._fill_max = fill_max_entries
        self._unavailable_after_s = unavailable_after_s
        self._subs: dict[str, _Subscription] = {}
        self._by_channel: dict[bytes, _Subscription] = {}
        self._shards: list[Shard] = []
        self._links: dict[str, _Link] = {}
        self._heard: dict[str, float] = {}  # when Redis last answered on a shard's lost link
        self._shard_ready: dict[str, bool] = {}
        self._fills: set[asyncio.Task[None]] = set()
        self._fill_limit = asyncio.Semaphore(_FILL_CONCURRENCY)
        self._stopping = False
        self.pushes = 0  # live pushes received
        self.history_reads = 0  # stream reads made to join, resume or fill
        self.gaps = 0  # pushes that did not continue their conversation's position
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
        """Shards whose subscriber connection has said nothing, not even to a ping, for far
        longer than a keepalive interval: a hung connection or a loop that stopped silently."""
        bound = self._ping_s * _SILENT_INTERVALS + 5.0
        return [name for name, link in self._links.items() if now - link.seen > bound]

    @property
    def redis_connections(self) -> int:
        """Subscriber connections (one per shard), for the scale-out measurements."""
        return len(self._shards)

    # --- sessions ------------------------------------------------------------------------------

    def attach(self, conversation_id: str, subscriber: Subscriber, tip: str) -> tuple[str, bool]:
        """Attach and return (position, is_new): entries after it reach the subscriber live.

        ``tip`` is the stream's last id as the caller just read it; a new subscription starts
        there and reads the stream once its channel is subscribed, so nothing appended between
        that read and the subscription is missed. Runs without awaiting, so no push can slip
        between choosing the position and joining the subscriber set.
        """
        sub = self._subs.get(conversation_id)
        created = sub is None
        if sub is None:
            channel = self._keys.live_channel(conversation_id).encode()
            sub = _Subscription(conversation_id, channel, self._keys.bucket(conversation_id),
                                tip, streams.parse_id(tip))
            self._subs[conversation_id] = sub
            self._by_channel[channel] = sub
            link = self._link_for(sub)
            if link is not None:
                self._want(link, channel)
                if link.live(channel):
                    sub.confirmed.set()
            self._start_fill(sub)
        sub.subscribers.add(subscriber)
        return sub.position, created

    def detach(self, conversation_id: str, subscriber: Subscriber) -> None:
        sub = self._subs.get(conversation_id)
        if sub is None:
            return
        sub.subscribers.discard(subscriber)
        if not sub.subscribers:
            self._drop(sub)

    def _drop(self, sub: _Subscription) -> None:
        sub.gone = True
        if self._subs.get(sub.conversation_id) is sub:
            del self._subs[sub.conversation_id]
            del self._by_channel[sub.channel]
            link = self._link_for(sub)
            if link is not None:
                self._unwant(link, sub.channel)

    def _link_for(self, sub: _Subscription) -> _Link | None:
        shard = self._router.shard_for(sub.bucket, self._shards)
        return self._links.get(shard.name) if shard is not None else None

    @staticmethod
    def _want(link: _Link, channel: bytes) -> None:
        if channel in link.to_drop:
            link.to_drop.discard(channel)  # never unsubscribed: still subscribed
        elif channel not in link.requested:
            link.to_add.add(channel)
            link.dirty.set()

    @staticmethod
    def _unwant(link: _Link, channel: bytes) -> None:
        if channel in link.to_add:
            link.to_add.discard(channel)
        elif channel in link.requested:
            link.to_drop.add(channel)
            link.dirty.set()

    # --- running -------------------------------------------------------------------------------

    async def stop(self, task: asyncio.Task[None], timeout_s: float = 2.0) -> None:
        """End the links and fills, then close the router's clients."""
        self._stopping = True
        task.cancel()
        await asyncio.wait({task}, timeout=timeout_s)
        fills = list(self._fills)
        for fill in fills:
            fill.cancel()
        await asyncio.gather(*fills, return_exceptions=True)
        await self._router.close()

    async def run(self) -> None:
        """Discover the nodes, serve each shard's link; start over when the topology changes."""
        backoff = _FIRST_BACKOFF_S
        while not self._stopping:
            try:
                self._metrics.topology_refreshes.inc()
                self._shards = await self._router.refresh()
                self._shard_ready = {s.name: False for s in self._shards}
                await self._serve_shards()
                backoff = _FIRST_BACKOFF_S
            except (TopologyChanged, RedisClusterException, RedisError, OSError) as exc:
                # Any Redis failure here is an outage or a failover: discovery itself raises
                # RedisClusterException (not a RedisError) while every cluster node is down.
                self._shard_ready = {}
                self._metrics.read_failed(exc)
                log.warning("hub_topology_refresh", reason=str(exc), retry_in_s=round(backoff, 2))
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF_S)

    async def _serve_shards(self) -> None:
        tasks = [asyncio.create_task(self._shard_loop(shard), name=f"hub-{shard.name}")
                 for shard in self._shards]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()  # a loop only ends early by raising: surface it
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _shard_loop(self, shard: Shard) -> None:
        """Serve the shard's link, again and again. An outage counts from the last time Redis
        answered on the link (the first failed or stalled read), and once one is counting every
        attempt is bounded by the time left: a frozen Redis accepts connections and answers
        nothing, so clients get 4503 ``unavailable_after_s`` after it froze, not later."""
        loop = asyncio.get_running_loop()
        backoff = _FIRST_BACKOFF_S
        down_since: float | None = None
        bound: asyncio.Timeout | None = None

        def up() -> None:  # Redis answered on the new link
            nonlocal backoff, down_since
            self._shard_ready[shard.name] = True
            if bound is not None:
                bound.reschedule(None)
            if down_since is not None:
                log.info("hub_link_recovered", node=shard.name)
            down_since, backoff = None, _FIRST_BACKOFF_S

        while not self._stopping:
            deadline = None if down_since is None else down_since + self._unavailable_after_s
            try:
                async with asyncio.timeout_at(deadline) as bound:
                    await self._serve_link(shard, up)
            except ResponseError as exc:
                if _is_redirect(exc):
                    raise TopologyChanged(str(exc)) from exc
                raise
            except _LINK_ERRORS as exc:  # TimeoutError (the bound) is an OSError
                self._shard_ready[shard.name] = False
                self._metrics.read_failed(exc)
                heard = self._heard.pop(shard.name, None)
                if down_since is None:
                    down_since = min(loop.time(), heard if heard is not None else loop.time())
                log.warning("hub_link_lost", node=shard.name, error=str(exc) or "no answer",
                            retry_in_s=round(backoff, 2))
                left = down_since + self._unavailable_after_s - loop.time()
                if left <= 0:
                    # Redis has been gone too long: send clients elsewhere rather than keep them
                    # half-alive, and look again at the topology (a replica may have taken over).
                    self._release(shard)
                    raise TopologyChanged(f"node {shard.name} unavailable") from exc
                await asyncio.sleep(min(backoff, left))
                backoff = min(backoff * 2, _MAX_BACKOFF_S)

    async def _serve_link(self, shard: Shard, on_up: Callable[[], None]) -> None:
        """Connect, subscribe every watched channel of the shard, dispatch until the connection
        fails; ``on_up`` runs once Redis first answers on it (a frozen Redis still accepts the
        connection). Whatever ends the link, its conversations refill once a new link confirms
        them."""
        conn = _subscriber_connection(shard)
        await conn.connect()  # type: ignore[no-untyped-call]
        link = _Link(shard, conn, seen=asyncio.get_running_loop().time(), on_up=on_up)
        link.to_add = {sub.channel for sub in self._subs.values() if shard.covers(sub.bucket)}
        link.dirty.set()
        self._links[shard.name] = link
        tasks = [asyncio.create_task(self._link_writer(link), name=f"hub-writer-{shard.name}"),
                 asyncio.create_task(self._link_reader(link), name=f"hub-reader-{shard.name}")]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
            raise RedisConnectionError(f"link to {shard.name} ended")
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._links.pop(shard.name, None)
            self._heard[shard.name] = link.seen
            self._lost(shard)
            with contextlib.suppress(*_LINK_ERRORS, RedisError):
                await conn.disconnect(nowait=True)

    def _lost(self, shard: Shard) -> None:
        """The shard's connection is gone, and with it any push sent meanwhile: every
        subscription it served fills from the stream once a new connection confirms it."""
        for sub in self._subs.values():
            if shard.covers(sub.bucket):
                sub.epoch += 1
                sub.confirmed.clear()
                sub.filling = True
                sub.check_history = True
                sub.pending.clear()
                self._start_fill(sub)

    async def _link_writer(self, link: _Link) -> None:
        """The only writer of the connection: (un)subscribes as clients come and go, pings it so
        a silent connection is noticed, and gives up when nothing came back for too long."""
        loop = asyncio.get_running_loop()
        while True:
            # asyncio.timeout, not wait_for: 3.11's wait_for can hold up a cancellation.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._ping_s):
                    await link.dirty.wait()
            link.dirty.clear()
            self.flush_metrics()
            if link.to_add:
                adding, link.to_add = list(link.to_add), set()
                link.requested.update(adding)
                for start in range(0, len(adding), _SUBSCRIBE_CHUNK):
                    await link.conn.send_command("SSUBSCRIBE",
                                                 *adding[start:start + _SUBSCRIBE_CHUNK])
            if link.to_drop:
                dropping, link.to_drop = list(link.to_drop), set()
                link.requested.difference_update(dropping)
                for channel in dropping:
                    link.leaving[channel] = link.leaving.get(channel, 0) + 1
                for start in range(0, len(dropping), _SUBSCRIBE_CHUNK):
                    await link.conn.send_command("SUNSUBSCRIBE",
                                                 *dropping[start:start + _SUBSCRIBE_CHUNK])
            if loop.time() - link.seen > self._ping_s * _SILENT_INTERVALS:
                raise RedisTimeoutError(f"no reply from {link.shard.name} for "
                                        f"{loop.time() - link.seen:.1f} s")
            if link.requested:
                await link.conn.send_command("PING")
            else:
                link.heard(loop.time())  # nothing subscribed: nothing to say (RESP2 pub/sub)

    async def _link_reader(self, link: _Link) -> None:
        loop = asyncio.get_running_loop()
        on_push, on_subscribed, on_unsubscribed = (self._on_push, self._on_subscribed,
                                                   self._on_unsubscribed)

        def dispatch(replies: list[Any]) -> None:
            link.heard(loop.time())
            for reply in replies:
                kind = reply[0]
                if kind == b"smessage":
                    on_push(reply[1], reply[2])
                elif kind == b"ssubscribe":
                    on_subscribed(link, reply[1])
                elif kind == b"sunsubscribe":
                    on_unsubscribed(link, reply[1])

        await read_replies(link.conn, dispatch)

    def _on_subscribed(self, link: _Link, channel: bytes) -> None:
        link.confirmed.add(channel)
        sub = self._by_channel.get(channel)
        if sub is not None and link.live(channel):
            sub.confirmed.set()

    def _on_unsubscribed(self, link: _Link, channel: bytes) -> None:
        link.confirmed.discard(channel)
        leaving = link.leaving.get(channel, 0)
        if leaving:
            if leaving == 1:
                del link.leaving[channel]
            else:
                link.leaving[channel] = leaving - 1
            sub = self._by_channel.get(channel)
            if sub is not None and link.live(channel):
                sub.confirmed.set()
            return
        # Not asked for: the slot moved to another node (cluster resharding or failover).
        raise TopologyChanged(f"{link.shard.name} unsubscribed {channel!r}")

    def flush_metrics(self) -> None:
        tally, self._tally = self._tally, DeliveryTally()
        self._metrics.add_live(tally)

    def _release(self, shard: Shard) -> None:
        for sub in list(self._subs.values()):
            if shard.covers(sub.bucket):
                for subscriber in tuple(sub.subscribers):
                    subscriber.on_unavailable()

    # --- the hot path ----------------------------------------------------------------------------

    def _on_push(self, channel: bytes, data: bytes) -> None:
        self.pushes += 1
        sub = self._by_channel.get(channel)
        if sub is None:
            return  # unsubscribed a moment ago
        if sub.filling:
            self._buffer(sub, data)
        elif not self._apply(sub, data):
            self.gaps += 1
            sub.filling = True
            sub.check_history = True
            self._buffer(sub, data)
            self._start_fill(sub)

    @staticmethod
    def _buffer(sub: _Subscription, data: bytes) -> None:
        if len(sub.pending) < _PENDING_MAX:
            sub.pending.append(data)
        else:
            sub.pending.clear()
            sub.overflowed = True

    def _apply(self, sub: _Subscription, data: bytes) -> bool:
        """Deliver the entries of a push after the position; False when it does not continue the
        position (entries were missed: fill first). A push the hub cannot read counts as a gap,
        and the fill delivers its entries from the stream."""
        try:
            newline = data.index(b"\n")
            head = data[:newline].split(b" ")
            previous = streams.parse_id(head[0])
            if previous > sub.last:
                return False
            if previous < sub.last < streams.parse_id(head[1]) and sub.position != "0-0":
                # The stream says nothing lies between its tip and this push's first entry, yet
                # the entry delivered last lies there: the stream lost it (a flush, a restart or
                # failover that kept the connection).
                self._history_lost(sub, head[0].decode())
                return True
            view = memoryview(data)
            offset = newline + 1
            last, batch = sub.last, []
            raw_id = b""
            copies, tally = len(sub.subscribers), self._tally
            for index in range(1, len(head), 2):
                size = int(head[index + 1])
                parsed = streams.parse_id(head[index])
                if parsed > last:
                    raw_id = head[index]
                    frame = delivery_frame(raw_id, view[offset:offset + size])
                    batch.append((parsed, frame))
                    tally.add(data[offset:offset + _KIND_PREFIX], copies, len(frame))
                    last = parsed
                offset += size
        except (ValueError, IndexError, WireError):
            log.error("hub_bad_push", conversation_id=sub.conversation_id)
            return False
        if batch:
            self._metrics.pushed(len(batch), batch[0][0][0])
            sub.advance(batch, raw_id.decode())
            self.delivered += len(batch) * copies
        return True

    # --- filling from the stream --------------------------------------------------------------

    def _start_fill(self, sub: _Subscription) -> None:
        if sub.fill_task is None and not self._stopping:
            task = asyncio.create_task(self._fill(sub), name="hub-fill")
            sub.fill_task = task
            self._fills.add(task)
            task.add_done_callback(self._fill_done)

    def _fill_done(self, task: asyncio.Task[None]) -> None:
        self._fills.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("hub_fill_failed", error=repr(task.exception()))

    async def _fill(self, sub: _Subscription) -> None:
        """Read the stream after the position until caught up, then apply the buffered pushes;
        repeat while they still leave a gap or the connection changed meanwhile."""
        backoff = _FIRST_BACKOFF_S
        try:
            while not sub.gone:
                await sub.confirmed.wait()
                epoch = sub.epoch
                try:
                    if sub.check_history and not await self._history_kept(sub):
                        return
                    caught_up = await self._read_gap(sub)
                except (RedisError, OSError) as exc:
                    log.warning("hub_fill_retry", conversation_id=sub.conversation_id,
                                error=str(exc), retry_in_s=round(backoff, 2))
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, _MAX_BACKOFF_S)
                    continue
                if sub.gone:
                    return
                if not caught_up:
                    self._send_to_resume(sub)
                    return
                if epoch == sub.epoch and sub.confirmed.is_set() and self._drain(sub):
                    sub.filling = False
                    return
        finally:
            sub.fill_task = None

    async def _read_gap(self, sub: _Subscription) -> bool:
        """Pages of the stream after the position, delivered as read; False past the cap."""
        read = 0
        while True:
            async with self._fill_limit:
                rows = await streams.read_after(self._history, self._keys, sub.conversation_id,
                                                sub.position, count=self._page)
            self.history_reads += 1
            if sub.gone:
                return True
            batch = []
            copies, tally = len(sub.subscribers), self._tally
            for entry_id, stored in rows:
                parsed = streams.parse_id(entry_id)
                if parsed > sub.last:
                    frame = delivery_frame(entry_id.encode(), stored)
                    batch.append((parsed, frame))
                    tally.add(stored, copies, len(frame))
            if batch:
                self._metrics.pushed(len(batch), batch[0][0][0])
                sub.advance(batch, rows[-1][0])
                self.delivered += len(batch) * len(sub.subscribers)
            read += len(rows)
            if len(rows) < self._page:
                return True
            if read >= self._fill_max:
                return False

    def _drain(self, sub: _Subscription) -> bool:
        """Apply the buffered pushes; False when one leaves a gap (or some were dropped)."""
        if sub.overflowed:
            sub.overflowed = False
            return False
        while sub.pending and not sub.gone:
            data = sub.pending.popleft()
            if not self._apply(sub, data):
                return False  # the next read covers it (and what is left is filtered then)
        return True

    async def _history_kept(self, sub: _Subscription) -> bool:
        """False (and the clients told) when the stream no longer holds every entry after the
        position delivered: a fill would otherwise hand them a later turn in the middle of the
        one they were playing."""
        if sub.position != "0-0":
            async with self._fill_limit:
                info = await streams.stream_info(self._history, self._keys, sub.conversation_id)
            self.history_reads += 1
            if not info.can_resume_after(sub.position):
                self._history_lost(sub, info.last_id)
                return False
        sub.check_history = False
        return True

    def _history_lost(self, sub: _Subscription, stream_last_id: str) -> None:
        """Redis lost entries of the stream after what the clients got (restarted empty,
        flushed, a failover that lost writes): they are told exactly as a client resuming from a
        lost position is (closed with 1012 ``history_lost``; their resume gets ``recovered:
        false``), and a new subscription starts for whoever joins next."""
        log.warning("stream_history_lost", conversation_id=sub.conversation_id,
                    position=sub.position, stream_last_id=stream_last_id,
                    clients=len(sub.subscribers))
        subscribers = tuple(sub.subscribers)
        self._drop(sub)
        for subscriber in subscribers:
            subscriber.on_history_lost()

    def _send_to_resume(self, sub: _Subscription) -> None:
        """Too far behind to catch up here: clients resume through history on their own, and a
        new subscription starts for whoever joins next."""
        log.warning("hub_fill_capped", conversation_id=sub.conversation_id,
                    cap=self._fill_max, clients=len(sub.subscribers))
        subscribers = tuple(sub.subscribers)
        self._drop(sub)
        for subscriber in subscribers:
            subscriber.on_behind()


async def read_replies(conn: AbstractConnection,
                       on_replies: Callable[[list[Any]], None]) -> None:
    """Reads a connected subscriber connection until it fails, handing ``on_replies`` every
    reply that one read from the socket completed (at least one), in order. Raises what ended
    it: ConnectionError for a closed connection, an error reply, InvalidResponse for a protocol
    error, or whatever ``on_replies`` raised (its later replies are not handed on).

    Why not ``read_response`` per reply: a live push is one reply, and redis-py's async read path
    costs a task wake-up, a future and two coroutine calls per socket read and per reply, about a
    tenth of the edge's busy samples at light load in a profile. With hiredis (a dependency of the
    relay) and RESP2, as the hub's connections are, the connection's transport is handed to
    ``_ReplyProtocol``, which feeds redis-py's own configured hiredis reader straight from the
    event loop's read callback and dispatches there, with no task switch per read
    (docs/benchmarks.md has the A/B); writes still go through redis-py. Anything else falls back
    to ``read_response``."""
    protocol = _ReplyProtocol.take_over(conn, on_replies)
    if protocol is None:
        while True:
            on_replies([await conn.read_response(disconnect_on_error=True)])
    try:
        await protocol.ended
    finally:
        protocol.close()


class _ReplyProtocol(asyncio.Protocol):
    """Takes a redis-py connection's transport over for reading (see ``read_replies``). Flow
    control and the loss of the connection are passed on to redis-py's own protocol, so its
    writes (``send_command``) wait and fail exactly as before."""

    def __init__(self, previous: asyncio.BaseProtocol, reader: Any,
                 on_replies: Callable[[list[Any]], None]) -> None:
        self._previous = previous
        self._reader = reader
        self._on_replies = on_replies
        self.ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @classmethod
    def take_over(cls, conn: AbstractConnection,
                  on_replies: Callable[[list[Any]], None]) -> _ReplyProtocol | None:
        """None (nothing changed) unless the connection is open, parses with hiredis and
        speaks RESP2."""
        parser: Any = getattr(conn, "_parser", None)
        reader = getattr(parser, "_reader", None)
        stream = getattr(parser, "_stream", None)
        writer = getattr(conn, "_writer", None)
        if (not isinstance(parser, _AsyncHiredisParser) or reader is None or stream is None
                or writer is None or str(getattr(conn, "protocol", 2)) != "2"):
            return None
        transport = writer.transport
        if not isinstance(transport, asyncio.Transport) or transport.is_closing():
            return None
        protocol = cls(transport.get_protocol(), reader, on_replies)
        # Bytes redis-py's stream already took from the socket come first (none, in practice:
        # nothing is unsolicited in RESP2, and the hub reads from the start).
        buffered: Any = getattr(stream, "_buffer", None)
        if buffered:
            reader.feed(bytes(buffered))
            buffered.clear()
        transport.set_protocol(protocol)
        return protocol

    def data_received(self, data: bytes) -> None:
        if self.ended.done():
            return
        reader = self._reader
        reader.feed(data)
        replies: list[Any] = []
        try:
            reply = reader.gets()
            while reply is not NOT_ENOUGH_DATA:
                if isinstance(reply, Exception):
                    raise reply
                replies.append(reply)
                reply = reader.gets()
            if replies:
                self._on_replies(replies)
        except Exception as exc:  # noqa: BLE001 - ends the link, raised by read_replies
            self._end(exc)

    def eof_received(self) -> bool:
        self._end(RedisConnectionError("the subscriber connection was closed"))
        return False  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self._end(RedisConnectionError("the subscriber connection was closed"))
        self._previous.connection_lost(exc)

    def pause_writing(self) -> None:
        self._previous.pause_writing()

    def resume_writing(self) -> None:
        self._previous.resume_writing()

    def _end(self, exc: Exception) -> None:
        if not self.ended.done():
            self.ended.set_exception(exc)

    def close(self) -> None:
        """Stop reading; the connection itself is redis-py's to close."""
        if self.ended.done() and not self.ended.cancelled():
            self.ended.exception()  # retrieved: the caller raised it, or is being cancelled
        else:
            self.ended.cancel()


def _subscriber_connection(shard: Shard) -> AbstractConnection:
    """A connection of its own, with the shard client's address and credentials. It waits for
    pushes indefinitely (the hub's pings notice a dead one) and never runs a health check of its
    own, which would read a reply meant for the subscriber loop."""
    pool = shard.client.connection_pool
    kwargs = {**pool.connection_kwargs, "socket_timeout": None, "health_check_interval": 0}
    connection: AbstractConnection = pool.connection_class(**kwargs)
    return connection


def _is_redirect(exc: ResponseError) -> bool:
    text = str(exc)
    return text.startswith(("MOVED", "ASK", "CLUSTERDOWN", "TRYAGAIN"))
