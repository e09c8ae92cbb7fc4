"""What a continued turn reads back from the stream (``read_delivered``), on a real Redis: every
entry of the turn counted whether it ends mid-page, on a page's edge or after several pages, and
nothing counted when the turn's start is gone."""

from __future__ import annotations

import pytest

from relay import wire
from relay.streams import ConversationLog
from workers.speech import resume
from workers.speech.resume import read_delivered

CHUNK = b"\x01\x00" * 640


@pytest.mark.parametrize("audio_entries", [1, 2, 3, 4, 7])
async def test_every_page_of_the_turn_is_counted(redis_client, keys, monkeypatch, audio_entries):
    # Pages of 3; the turn holds its start, the chunks and the end marker: 3 entries fill one
    # page exactly, 4 and 5 end mid-page, 6 fill two, 9 three.
    monkeypatch.setattr(resume, "_PAGE", 3)
    log = ConversationLog(redis_client, keys, maxlen=1000, ttl_s=60)
    start = await log.open_turn("conv-pages", "t1", sample_rate=16000, owner="p")
    for seq in range(audio_entries):
        await log.append("conv-pages", "t1", wire.audio("t1", seq, CHUNK, end=False), epoch=0)
    await log.append("conv-pages", "t1", wire.audio("t1", audio_entries, b"", end=True), epoch=0)
    delivered = await read_delivered(redis_client, keys, "conv-pages", "t1", start)
    assert delivered is not None
    assert (delivered.next_seq, delivered.audio_bytes, delivered.audio_ended) == (
        audio_entries + 1, audio_entries * len(CHUNK), True)


async def test_a_turn_without_its_start_has_no_history(redis_client, keys):
    log = ConversationLog(redis_client, keys, maxlen=1000, ttl_s=60)
    start = await log.open_turn("conv-gone", "t1", sample_rate=16000, owner="p")
    await redis_client.xdel(keys.stream("conv-gone"), start)
    assert await read_delivered(redis_client, keys, "conv-gone", "t1", start) is None
