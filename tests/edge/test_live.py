"""The live path by push: gaps filled from the stream, a killed subscriber connection, the race
at join, one push per append (none for a retry), the fill cap, and sharded pub/sub on a cluster."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from relay import streams, wire
from relay.client import RelayClient
from relay.edge.hub import Hub
from relay.edge.routing import ClusterRouter, SingleRouter
from relay.keys import Keys
from relay.redis_conn import client_for, create_client
from relay.streams import ConversationLog, read_after
from relay.tokens import mint_token
from tests.conftest import TEST_SECRET
from tests.helpers.edge import Listener, running_edge
from tests.helpers.polling import eventually


def token(conversation_id: str) -> str:
    return mint_token(TEST_SECRET, conversation_id, ttl_s=300)


class Recorder:
    """A hub subscriber that keeps what it was offered, decoded."""

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.calls = 0
        self.behind = False
        self.unavailable = False

    def offer_many(self, batch: list[tuple[tuple[int, int], bytes]]) -> None:
        self.calls += 1
        for _, frame in batch:
            payload = frame[2:] if frame[1] < 126 else frame[4:] if frame[1] == 126 else frame[10:]
            message = wire.decode_server(payload)
            assert message.id is not None
            self.ids.append(message.id)

    def on_unavailable(self) -> None:
        self.unavailable = True

    def on_behind(self) -> None:
        self.behind = True


@contextlib.asynccontextmanager
async def running_hub(redis_url: str, keys: Keys, *, fill_max: int = 16_384, page: int = 512):
    client = create_client(redis_url, block_ms=1000)
    reader = create_client(redis_url, block_ms=1000, max_connections=4)
    hub = Hub(SingleRouter(reader), keys, client, ping_ms=200, page=page,
              fill_max_entries=fill_max, unavailable_after_s=30.0)
    task: asyncio.Task[None] | None = None

    def start() -> None:
        nonlocal task
        task = asyncio.create_task(hub.run())

    try:
        yield hub, start
    finally:
        if task is None:
            start()
        assert task is not None
        await hub.stop(task)
        await client.aclose()


async def truth(redis_client, keys, conv) -> list[str]:
    return [i for i, _ in await read_after(redis_client, keys, conv, "0-0", count=100_000)]


async def test_a_missed_push_is_filled_from_the_stream_before_delivery(
        redis_url, redis_client, keys):
    # Two pushes go by unseen (the hub is made deaf to the channel for them, as when pushes
    # are lost): the next push names a predecessor past the hub's position, so the hub reads
    # the two missed appends from the stream before delivering it, once each, in order.
    log = ConversationLog(redis_client, keys, maxlen=10_000, ttl_s=300)
    conv = "gap-conv"
    async with running_hub(redis_url, keys) as (hub, start):
        start()
        await eventually(lambda: hub.ready, what="hub ready")
        recorder = Recorder()
        hub.attach(conv, recorder, "0-0")
        await eventually(lambda: hub.history_reads >= 1, what="the join read")
        await log.open_turn(conv, "t1", sample_rate=16000, owner="test")
        await eventually(lambda: len(recorder.ids) == 1, what="turn_start")
        channel = keys.live_channel(conv).encode()
        subscription = hub._by_channel.pop(channel)  # deaf: its pushes are dropped
        await log.append(conv, "t1", wire.audio("t1", 0, b"a", end=False))
        await log.append(conv, "t1", wire.audio("t1", 1, b"b", end=False),
                         wire.frames("t1", 0, b"env", last=False))
        await eventually(lambda: hub.pushes >= 3, what="the unseen pushes")
        hub._by_channel[channel] = subscription
        reads = hub.history_reads
        await log.append(conv, "t1", wire.audio("t1", 2, b"c", end=True))
        await log.end_turn(conv, "t1", status=wire.STATUS_COMPLETE)
        await eventually(lambda: len(recorder.ids) == 6, what="every entry")
        assert recorder.ids == await truth(redis_client, keys, conv)
        assert hub.gaps == 1 and hub.history_reads > reads
        hub.detach(conv, recorder)


async def test_killing_the_pubsub_connection_mid_load_loses_and_repeats_nothing(
        settings, redis_client, keys):
    log = ConversationLog(redis_client, keys, maxlen=100_000, ttl_s=300)
    convs = [f"kill-{n}" for n in range(4)]
    async with running_edge(settings, "edge-kill") as url:
        listeners = [Listener(RelayClient(url, c, token(c))) for c in convs]
        for listener in listeners:
            await listener.joined()

        async def speak(conv: str) -> None:
            await log.open_turn(conv, "t1", sample_rate=16000, owner="test")
            for seq in range(300):
                await log.append(conv, "t1", wire.audio("t1", seq, b"x" * 320, end=False))
                if seq % 20 == 0:
                    await asyncio.sleep(0.005)
            await log.end_turn(conv, "t1", status=wire.STATUS_COMPLETE)

        writers = asyncio.gather(*(speak(c) for c in convs))
        killed = 0
        for _ in range(3):
            await asyncio.sleep(0.15)
            killed += await redis_client.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
        await writers
        assert killed >= 1, "no subscriber connection to kill"
        for conv, listener in zip(convs, listeners, strict=True):
            received = await listener.wait_for(lambda ms: ms and ms[-1].kind == "turn_end")
            assert [m.id for m in received] == await truth(redis_client, keys, conv)
            assert listener.client.close_codes == []  # clients never noticed
            await listener.close()


async def test_entries_appended_while_subscribing_are_read_at_join(redis_url, redis_client, keys):
    # The subscription is made before the hub has any connection: the push of the only entry
    # appended meanwhile reaches nobody, and no push follows. The join read delivers it.
    log = ConversationLog(redis_client, keys, maxlen=1000, ttl_s=300)
    conv = "race-conv"
    info = await streams.stream_info(redis_client, keys, conv)
    async with running_hub(redis_url, keys) as (hub, start):
        recorder = Recorder()
        position, created = hub.attach(conv, recorder, info.last_id)
        assert created and position == "0-0"
        start_id = await log.open_turn(conv, "t1", sample_rate=16000, owner="test")
        start()
        await eventually(lambda: recorder.ids, what="the join read")
        assert recorder.ids == [start_id]
        # From here on delivery is by push: one more entry arrives without a stream read.
        reads = hub.history_reads
        await eventually(lambda: hub.ready, what="hub ready")
        await log.append(conv, "t1", wire.audio("t1", 0, b"a", end=False))
        await eventually(lambda: len(recorder.ids) == 2, what="the push")
        assert recorder.ids == await truth(redis_client, keys, conv)
        assert hub.history_reads == reads
        hub.detach(conv, recorder)


async def test_one_append_is_one_push_and_a_retried_append_pushes_nothing(
        redis_url, redis_client, keys):
    log = ConversationLog(redis_client, keys, maxlen=1000, ttl_s=300)
    conv = "push-conv"
    async with running_hub(redis_url, keys) as (hub, start):
        start()
        await eventually(lambda: hub.ready, what="hub ready")
        recorder = Recorder()
        hub.attach(conv, recorder, "0-0")
        await eventually(lambda: hub.history_reads >= 1, what="the join read")
        await log.open_turn(conv, "t1", sample_rate=16000, owner="test")
        await eventually(lambda: len(recorder.ids) == 1, what="turn_start")
        pushes = hub.pushes
        batch = [wire.audio("t1", seq, b"a", end=False) for seq in range(3)]
        first = await log.append(conv, "t1", *batch)
        again = await log.append(conv, "t1", *batch)  # a retry: appends nothing
        await log.end_turn(conv, "t1", status=wire.STATUS_COMPLETE)
        await eventually(lambda: len(recorder.ids) == 5, what="five entries")
        assert again == first
        assert hub.pushes - pushes == 2  # the batch and turn_end; the retry pushed nothing
        assert recorder.ids == await truth(redis_client, keys, conv)
        assert hub.gaps == 0
        hub.detach(conv, recorder)


async def test_a_gap_beyond_the_cap_sends_clients_to_resume(redis_url, redis_client, keys):
    log = ConversationLog(redis_client, keys, maxlen=10_000, ttl_s=300)
    conv = "cap-conv"
    await log.open_turn(conv, "t1", sample_rate=16000, owner="test")
    for start_seq in range(0, 600, 200):
        await log.append(conv, "t1", *[wire.audio("t1", s, b"a", end=False)
                                       for s in range(start_seq, start_seq + 200)])
    async with running_hub(redis_url, keys, fill_max=256, page=64) as (hub, start):
        recorder = Recorder()
        hub.attach(conv, recorder, "0-0")  # 601 entries behind
        start()
        await eventually(lambda: recorder.behind, what="on_behind")
        assert 256 <= len(recorder.ids) < 601
        assert recorder.ids == (await truth(redis_client, keys, conv))[:len(recorder.ids)]
        assert hub.conversations == 0  # the next joiner starts a fresh subscription


async def test_cluster_pushes_reach_only_the_shard_that_owns_the_conversation(
        cluster_url, key_prefix):
    settings_keys = Keys(key_prefix)
    cluster = client_for_cluster(cluster_url)
    log = ConversationLog(cluster, settings_keys, maxlen=1000, ttl_s=300)
    convs = [f"shard-{n}" for n in range(6)]
    assert len({settings_keys.bucket(c) for c in convs}) > 1
    hub = Hub(ClusterRouter(cluster, settings_keys, block_ms=1000), settings_keys, cluster,
              ping_ms=200, page=512, fill_max_entries=16_384)
    task = asyncio.create_task(hub.run())
    try:
        await eventually(lambda: hub.ready, timeout_s=10, what="cluster hub ready")
        recorders = {c: Recorder() for c in convs}
        for conv, recorder in recorders.items():
            hub.attach(conv, recorder, "0-0")
        await eventually(lambda: hub.history_reads >= len(convs), what="join reads")
        for conv in convs:
            await log.open_turn(conv, "t1", sample_rate=16000, owner="test")
            await log.append(conv, "t1", wire.audio("t1", 0, b"a", end=True))
        await eventually(lambda: all(len(r.ids) == 2 for r in recorders.values()),
                         what="delivery on every shard")
        # Each channel has its subscriber on the node owning its slot, and only there.
        nodes = cluster.get_primaries()
        for conv in convs:
            channel = settings_keys.live_channel(conv)
            owner = cluster.get_node_from_key(channel)
            counts = {}
            for node in nodes:
                reply = await cluster.execute_command("PUBSUB", "SHARDNUMSUB", channel,
                                                      target_nodes=node)
                counts[node.name] = int(reply[1]) if isinstance(reply, list) else 0
            assert counts[owner.name] == 1
            assert sum(counts.values()) == 1
            rows = await read_after(cluster, settings_keys, conv, "0-0", count=10)
            assert recorders[conv].ids == [i for i, _ in rows]
        assert hub.gaps == 0
    finally:
        await hub.stop(task)
        await cluster.aclose()


def client_for_cluster(url: str):
    from relay.settings import Settings

    return client_for(Settings(redis_url=url, redis_cluster=True), block_ms=1000)


@pytest.mark.parametrize("size", [5, 200, 70_000])
def test_delivery_frame_is_the_spliced_message_in_one_websocket_frame(size):
    from relay.edge.framing import binary_frame, delivery_frame

    stored = wire.audio("t", 1, b"z" * size, end=False)
    frame = delivery_frame(b"1700000000000-3", memoryview(b"xx" + stored)[2:])
    assert frame == binary_frame(wire.delivery("1700000000000-3", stored))
    assert wire.decode_server(wire.delivery(b"1700000000000-3", stored)).id == "1700000000000-3"


async def test_a_turn_opened_between_the_tip_read_and_attaching_reaches_the_joining_client(
    settings, redis_client, keys, monkeypatch,
):
    # The join race, forced: a client joins live while no turn plays; between the edge reading
    # the stream's tip and attaching the client to the hub (whose subscription, made for a first
    # client, has already delivered them), a turn opens and its first audio is appended. The
    # joining client must get that turn from its turn_start, nothing twice and nothing missed.
    from relay.edge import app as edge_app

    log = ConversationLog(redis_client, keys, maxlen=1000, ttl_s=300)
    conv = "join-race"
    choose_start = edge_app.choose_start
    async with running_edge(settings, "edge-race") as url:
        first = Listener(RelayClient(url, conv, token(conv)))
        await first.joined()
        appended: list[str] = []

        async def tip_then_turn(*args, **kwargs):
            placed = await choose_start(*args, **kwargs)
            appended.append(await log.open_turn(conv, "t1", sample_rate=16000, owner="test"))
            appended.append(await log.append(conv, "t1", wire.audio("t1", 0, b"a", end=False)))
            # The hub applied the push before the second client attaches: it is not in it.
            await first.wait_for(lambda got: [m.id for m in got] == appended)
            return placed

        monkeypatch.setattr(edge_app, "choose_start", tip_then_turn)
        second = Listener(RelayClient(url, conv, token(conv)))
        await second.joined()
        monkeypatch.setattr(edge_app, "choose_start", choose_start)
        assert second.client.welcomes[0].fields["start"] == "live"
        await second.wait_for(lambda got: len(got) >= 2, timeout=10)
        appended.append(await log.append(conv, "t1", wire.audio("t1", 1, b"b", end=True)))
        got = await second.wait_for(lambda got: len(got) >= 3, timeout=10)
        assert [m.id for m in got] == appended == await truth(redis_client, keys, conv)
        assert [m.kind for m in got] == ["turn_start", "audio", "audio"]
        await first.close()
        await second.close()


@pytest.mark.parametrize("parser", ["hiredis", "python"])
async def test_the_subscriber_reads_every_reply_in_order_and_notices_a_closed_connection(
        redis_url, redis_client, keys, parser):
    """The hub's reply reader: with hiredis every reply one socket read completed comes in one
    call, otherwise one reply per call through redis-py; either way all of them, in order,
    while redis-py still writes on the connection, and a connection Redis closes ends the
    reading with ConnectionError."""
    import redis.asyncio as aioredis
    from redis._parsers import _AsyncRESP2Parser
    from redis.exceptions import ConnectionError as RedisConnectionError

    from relay.edge.hub import read_replies

    options = {} if parser == "hiredis" else {"parser_class": _AsyncRESP2Parser}
    subscriber = aioredis.Redis.from_url(redis_url, **options)
    pool = subscriber.connection_pool
    # As the hub makes its connections: no read timeout, no health check of its own.
    conn = pool.connection_class(**{**pool.connection_kwargs, "socket_timeout": None,
                                    "health_check_interval": 0})
    await conn.connect()
    replies: list = []
    calls: list[int] = []
    arrived = asyncio.Event()

    def on_replies(batch):
        replies.extend(batch)
        calls.append(len(batch))
        arrived.set()

    async def until(count):
        async with asyncio.timeout(5):
            while len(replies) < count:
                arrived.clear()
                await arrived.wait()

    reading = asyncio.create_task(read_replies(conn, on_replies))
    try:
        channel = f"{keys.prefix}-reader".encode()
        await conn.send_command("SSUBSCRIBE", channel)
        await until(1)
        assert replies[0][0] == b"ssubscribe"
        payloads = [f"push {i} ".encode() * (i + 1) for i in range(50)]
        async with redis_client.pipeline(transaction=False) as pipe:
            for payload in payloads:
                pipe.spublish(channel, payload)
            await pipe.execute()
        await until(1 + len(payloads))
        assert [r[0] for r in replies[1:]] == [b"smessage"] * len(payloads)
        assert [r[2] for r in replies[1:]] == payloads
        if parser == "python":
            assert set(calls) == {1}  # one reply per call: redis-py's own path
        else:
            assert len(calls) < 1 + len(payloads)  # pipelined pushes share socket reads
        await conn.send_command("PING")  # redis-py's writes still work beside the reader
        await until(2 + len(payloads))
        assert replies[-1][0] == b"pong"
        await redis_client.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
        with pytest.raises(RedisConnectionError):
            async with asyncio.timeout(5):
                await reading
    finally:
        reading.cancel()
        await asyncio.gather(reading, return_exceptions=True)
        await conn.disconnect(nowait=True)
        await subscriber.aclose()


async def test_what_the_reply_handler_raises_ends_the_reading(redis_url, redis_client, keys):
    """An exception from the handler (the hub's TopologyChanged, say) is what the reading
    raises, and the replies after it are not handed on."""
    import redis.asyncio as aioredis

    from relay.edge.hub import read_replies

    subscriber = aioredis.Redis.from_url(redis_url)
    pool = subscriber.connection_pool
    conn = pool.connection_class(**{**pool.connection_kwargs, "socket_timeout": None,
                                    "health_check_interval": 0})
    await conn.connect()
    seen: list = []

    def on_replies(batch):
        for reply in batch:
            seen.append(reply)
            if reply[0] == b"smessage":
                raise LookupError("stop here")

    reading = asyncio.create_task(read_replies(conn, on_replies))
    try:
        channel = f"{keys.prefix}-raise".encode()
        await conn.send_command("SSUBSCRIBE", channel)
        async with asyncio.timeout(5):
            while not seen:
                await asyncio.sleep(0.01)
        async with redis_client.pipeline(transaction=False) as pipe:
            for index in range(3):
                pipe.spublish(channel, b"m%d" % index)
            await pipe.execute()
        with pytest.raises(LookupError, match="stop here"):
            async with asyncio.timeout(5):
                await reading
        assert [r[0] for r in seen] == [b"ssubscribe", b"smessage"]
        assert seen[1][2] == b"m0"
    finally:
        reading.cancel()
        await asyncio.gather(reading, return_exceptions=True)
        await conn.disconnect(nowait=True)
        await subscriber.aclose()
