"""A client that reads slower than its conversation speaks gets the documented 4429 close: the edge
bounds what it wrote but the client has not read, so the backlog overflows its queue and the close
frame reaches the client before any heartbeat timeout; nothing on the edge logs a traceback or a
refused message for it."""

from __future__ import annotations

import asyncio
import logging
import os

from structlog.testing import capture_logs

from relay import wire
from relay.client import RelayClient
from relay.streams import ConversationLog, read_after
from relay.tokens import mint_token
from tests.conftest import TEST_SECRET
from tests.helpers.edge import Listener, RawWebSocket, running_edge

RATE_BYTES_S = 20_000  # how fast the slow client reads
SPEAK_BYTES_S = 51_200  # how fast the conversation speaks (16 kHz PCM16 plus some)


def token(conversation_id: str) -> str:
    return mint_token(TEST_SECRET, conversation_id, ttl_s=300)


async def speak(log: ConversationLog, conv: str, turn: str, seconds: float) -> None:
    """Audio entries at SPEAK_BYTES_S, in 50 ms chunks."""
    await log.open_turn(conv, turn, sample_rate=16000, owner="test")
    chunk = os.urandom(SPEAK_BYTES_S // 20)
    for seq in range(int(seconds * 20)):
        await log.append(conv, turn, wire.audio(turn, seq, chunk, end=False))
        await asyncio.sleep(0.05)


async def pong(ws: RawWebSocket, payload: bytes) -> None:
    """Answer the edge's heartbeat as a browser would (client frames are masked)."""
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    ws.writer.write(bytes([0x8A, 0x80 | len(payload)]) + mask + masked)
    await ws.writer.drain()


async def read_slowly(ws: RawWebSocket, timeout_s: float) -> tuple[list[wire.Message], int | None]:
    """Read frames at RATE_BYTES_S until the close frame; (messages, close code)."""
    got: list[wire.Message] = []
    async with asyncio.timeout(timeout_s):
        while True:
            opcode, payload = await ws.frame()
            if opcode == 0x2:
                got.append(wire.decode_server(payload))
            elif opcode == 0x9:
                await pong(ws, payload)
            elif opcode == 0x8:
                return got, int.from_bytes(payload[:2], "big")
            await asyncio.sleep(len(payload) / RATE_BYTES_S)


async def test_a_client_reading_slower_than_the_stream_gets_4429(settings, redis_client, keys,
                                                                  caplog):
    # The queue of the fault run that found the bug (256 messages / 64 KiB): the backlog must
    # wait there, where it counts, not in socket buffers, and the close frame must reach a
    # client reading at 20 KB/s before the heartbeat (the default 20 s) gives up on it.
    limits = settings.with_overrides(client_queue_messages=256, client_queue_bytes=64 * 1024)
    log = ConversationLog(redis_client, keys, maxlen=100_000, ttl_s=300)
    conv = "slow-reader"
    caplog.set_level(logging.ERROR)
    with capture_logs() as events:
        async with running_edge(limits, "edge-slow-reader") as url:
            slow = await RawWebSocket.connect(
                f"{url}/v1/conversations/{conv}/ws?token={token(conv)}")
            speaking = asyncio.create_task(speak(log, conv, "t-slow", seconds=30))
            loop = asyncio.get_running_loop()
            started = loop.time()
            got, code = await read_slowly(slow, timeout_s=25)
            took = loop.time() - started
            speaking.cancel()
            slow.close()
            # A resume from the last message the slow client got is exact.
            last_id = [m.id for m in got if m.id][-1]
            truth = [i for i, _ in await read_after(redis_client, keys, conv, "0-0",
                                                   count=100_000)]
            resumed = Listener(RelayClient(url, conv, token(conv), last_id=last_id))
            rest = await resumed.wait_for(lambda ms: len(ms) >= 1, timeout=10)
            assert resumed.client.welcomes[0].get("recovered") is True
            assert rest[0].id == truth[truth.index(last_id) + 1]
            await resumed.close()
    print(f"slow client: close {code} after {took:.1f}s, {len(got) - 1} entries read")
    assert code == wire.CloseCode.SLOW_CONSUMER
    ids = [m.id for m in got if m.id]
    assert ids == truth[:len(ids)]  # in order, nothing skipped before the close
    assert took < 12  # the queue fills in ~2 s, then the bounded backlog is read at 20 KB/s
    names = [e["event"] for e in events]
    assert "client_message_refused" not in names
    left = [e for e in events if e["event"] == "client_left" and e.get("code") == 4429]
    assert left and left[0]["reason"] == "slow_consumer"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], "traceback logged"
