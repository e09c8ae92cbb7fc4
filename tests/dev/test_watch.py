"""``relay watch``: one conversation's stream on a terminal, from Redis or through a real edge,
with warnings for what a client would trip over."""

from __future__ import annotations

import asyncio
import io

from relay import wire
from relay.dev.watch import WatchView, from_edge, from_stream, watch
from relay.streams import ConversationLog
from relay.tokens import mint_token
from tests.conftest import TEST_SECRET
from tests.helpers.edge import running_edge


def message(entry_id: str, stored: bytes) -> wire.Message:
    return wire.decode_server(wire.delivery(entry_id, stored))


def test_view_shows_each_message_and_flags_gaps_and_orphans() -> None:
    view = WatchView(show_now=lambda: 1_700_000_000.0)
    lines = []
    for entry_id, stored in [
        ("1700000000000-0", wire.turn_start("t1", sample_rate=16000)),
        ("1700000000040-0", wire.audio("t1", 0, b"a" * 1280, end=False)),
        ("1700000000080-0", wire.audio("t1", 2, b"b" * 1280, end=False)),  # seq 1 is missing
        ("1700000000900-0", wire.frames("t1", 0, b"env", last=True)),  # 820 ms later
        ("1700000000950-0", wire.turn_end("t1", status="complete")),
        ("1700000001000-0", wire.audio("t2", 5, b"c" * 10, end=True)),  # joined mid-turn
    ]:
        lines += view.feed(message(entry_id, stored))
    text = "\n".join(lines)
    assert "turn_start" in lines[0] and "rate=16000" in lines[0]
    assert "audio" in lines[1] and "#0" in lines[1] and "1280 B" in lines[1]
    assert "!! audio seq gap: expected #1, got #2" in text
    assert "!! 820 ms of silence inside the turn" in text
    assert "== turn t1 complete: 2 audio (2560 B), 1 frames, 950 ms" in text
    assert "!! audio of turn t2 without its turn_start" in text
    assert sum(line.startswith("!!") for line in lines) == 3


async def write_turn(log: ConversationLog, conv: str, turn: str) -> None:
    await log.open_turn(conv, turn, sample_rate=16000, owner="test")
    for seq in range(3):
        await log.append(conv, turn, wire.audio(turn, seq, b"\0" * 640, end=seq == 2))
    await log.append(conv, turn, wire.frames(turn, 0, b"env", last=True))
    await log.end_turn(conv, turn, status=wire.STATUS_COMPLETE)


async def test_watch_from_the_stream_and_through_an_edge(settings, redis_client, keys) -> None:
    log = ConversationLog(redis_client, keys, maxlen=1000, ttl_s=300)
    conv = "watch-conv"
    await write_turn(log, conv, "t1")
    out = io.StringIO()
    warnings = await asyncio.wait_for(
        watch(from_stream(settings, conv, start="0-0"), out=out, max_turns=1), 10)
    stream_lines = out.getvalue().splitlines()
    assert warnings == 0
    assert [line.split()[3] for line in stream_lines[:6]] == [
        "turn_start", "audio", "audio", "audio", "frames", "turn_end"]
    assert "== turn t1 complete: 3 audio (1920 B), 1 frames" in stream_lines[6]

    async with running_edge(settings, "edge-watch") as url:
        out = io.StringIO()
        token = mint_token(TEST_SECRET, conv, ttl_s=300)
        watching = asyncio.create_task(
            watch(from_edge(settings, conv, edge=url, token=token), out=out, max_turns=1))
        for _ in range(200):
            if "edge welcome" in out.getvalue():
                break
            await asyncio.sleep(0.02)
        await write_turn(log, conv, "t2")
        assert await asyncio.wait_for(watching, 10) == 0
    edge_lines = out.getvalue().splitlines()
    assert edge_lines[0].startswith("-- edge welcome:") and "start=live" in edge_lines[0]
    assert "== turn t2 complete: 3 audio (1920 B), 1 frames" in edge_lines[-1]
