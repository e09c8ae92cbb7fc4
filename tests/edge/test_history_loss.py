"""Live clients are told when Redis loses the history of the stream they watch, exactly as a client
resuming from a lost position is: closed with 1012 ``history_lost``, they reconnect with their
last_id and get ``welcome{recovered: false}``, and never a later turn in the middle of the one they
were playing."""

from __future__ import annotations

import asyncio

from relay import wire
from relay.client import RelayClient
from relay.dev.embedded import EmbeddedServer
from relay.redis_conn import create_client
from relay.streams import ConversationLog
from relay.tokens import mint_token
from tests.conftest import TEST_SECRET
from tests.helpers.edge import running_edge


class Recorder:
    """Every message a client yields, welcomes included, in order."""

    def __init__(self, client: RelayClient) -> None:
        self.client = client
        self.messages: list[wire.Message] = []
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async for message in self.client.messages():
            self.messages.append(message)

    async def wait_for(self, predicate, timeout_s: float = 15.0) -> None:
        async with asyncio.timeout(timeout_s):
            while not predicate(self.messages):
                await asyncio.sleep(0.02)

    async def close(self) -> None:
        await self.client.close()
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


def welcomes(messages: list[wire.Message]) -> list[wire.Message]:
    return [m for m in messages if m.kind == wire.WELCOME]


async def test_live_client_is_told_when_redis_is_flushed_under_it(settings, keys):
    # FLUSHALL: no connection breaks, so only the hub's own check can notice.
    server = EmbeddedServer().start()
    client = create_client(server.url)
    try:
        local = settings.with_overrides(redis_url=server.url)
        log = ConversationLog(client, keys, maxlen=1000, ttl_s=300)
        async with running_edge(local, "edge-flush") as url:
            conv = "flushed-conv"
            token = mint_token(TEST_SECRET, conv, ttl_s=300)
            watcher = Recorder(RelayClient(url, conv, token, max_backoff_s=0.2))
            await watcher.wait_for(lambda ms: len(welcomes(ms)) == 1)
            await log.open_turn(conv, "t1", sample_rate=16000, owner="test")
            await log.append(conv, "t1", wire.audio("t1", 0, b"before", end=False))
            await watcher.wait_for(lambda ms: any(m.kind == wire.AUDIO for m in ms))

            await client.flushall()  # t1 never ends: its record went with everything else
            await log.open_turn(conv, "t2", sample_rate=16000, owner="test")
            await log.append(conv, "t2", wire.audio("t2", 0, b"after", end=True))
            await watcher.wait_for(lambda ms: any(m.turn == "t2" and m.kind == wire.AUDIO
                                                  for m in ms))
            messages = watcher.messages
            second = [i for i, m in enumerate(messages) if m.kind == wire.WELCOME][1]
            assert messages[second].get("recovered") is False
            # Nothing of t2 reached the client before it was told t1's history is gone.
            assert not [m for m in messages[:second] if m.turn == "t2"]
            assert [m.get("data") for m in messages if m.kind == wire.AUDIO] == [b"before",
                                                                                 b"after"]
            assert watcher.client.close_codes[0] == wire.CloseCode.EDGE_RESTARTING
            await watcher.close()
    finally:
        await client.aclose()
        server.stop()


async def test_a_client_that_had_the_turns_start_is_not_sent_it_again_after_a_loss(
    settings, keys, redis_client,
):
    # Redis restarted from a file missing its last writes, as redis_killed in the fault suite
    # does: the stream and the turn record go back to an earlier state, the turn still active,
    # and a client resumes from a position the stream no longer reaches. It already had that
    # turn's start (and more): sending the turn from its start would deliver ids it has. It is
    # told (recovered: false) and goes on with the next turn.
    log = ConversationLog(redis_client, keys, maxlen=1000, ttl_s=300)
    conv = "lost-tail-conv"
    await log.open_turn(conv, "t1", sample_rate=16000, owner="test")
    await log.append(conv, "t1", wire.audio("t1", 0, b"kept", end=False))
    saved = {key: await redis_client.dump(key) for key in (keys.stream(conv), keys.turn(conv))}
    position = await log.append(conv, "t1", wire.audio("t1", 1, b"lost", end=False))
    for key, value in saved.items():  # the lost write
        await redis_client.restore(key, 0, value, replace=True)
    async with running_edge(settings, "edge-loss") as url:
        token = mint_token(TEST_SECRET, conv, ttl_s=300)
        watcher = Recorder(RelayClient(url, conv, token, last_id=position, reconnect=False))
        await watcher.wait_for(lambda ms: len(welcomes(ms)) == 1)
        await log.append(conv, "t1", wire.audio("t1", 1, b"after the loss", end=True))
        await log.end_turn(conv, "t1", status="complete")
        await log.open_turn(conv, "t2", sample_rate=16000, owner="test")
        await log.append(conv, "t2", wire.audio("t2", 0, b"next", end=True))
        await watcher.wait_for(lambda ms: any(m.turn == "t2" and m.kind == wire.AUDIO
                                              for m in ms))
        welcome = welcomes(watcher.messages)[0]
        assert welcome.get("recovered") is False and welcome.get("start") == "next_turn"
        # Nothing of t1 (whose start it had): t2 from its start on.
        delivered = [m for m in watcher.messages if m.kind != wire.WELCOME]
        assert {m.turn for m in delivered} == {"t2"}
        assert delivered[0].kind == wire.TURN_START
        await watcher.close()
