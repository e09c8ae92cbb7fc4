"""``relay enqueue`` and ``relay jobs`` as an operator runs them (real subprocesses)."""

from __future__ import annotations

import asyncio
import json
import wave

from tests.helpers.cli import relay
from tests.helpers.producer import (
    RATE,
    assert_complete,
    tone,
    wait_turn_end,
)
from workers.queue.deadletters import DeadLetters
from workers.queue.jobs import KIND_CLIP, TurnJob, decode_job


def write_wav(path, pcm: bytes, *, rate: int = RATE, channels: int = 1) -> None:
    with wave.open(str(path), "wb") as out:
        out.setnchannels(channels)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(pcm)


async def cli(settings, *args: str):
    env = {"REDIS_URL": settings.redis_url, "RELAY_KEY_PREFIX": settings.key_prefix}
    return await asyncio.to_thread(relay, *args, **env)


async def test_enqueue_reads_wav_and_pcm(settings, redis_client, keys, tmp_path):
    clip = tone(0.3)
    write_wav(tmp_path / "hello.wav", clip, rate=24000)
    (tmp_path / "hello.pcm").write_bytes(clip)
    from_wav = await cli(settings, "enqueue", "conv-cli", str(tmp_path / "hello.wav"),
                         "--avatar", "av-1", "--turn-id", "t-wav")
    assert from_wav.returncode == 0, from_wav.stderr
    assert from_wav.stdout.strip() == "t-wav"
    from_pcm = await cli(settings, "enqueue", "conv-cli", str(tmp_path / "hello.pcm"),
                         "--rate", "16000")
    assert from_pcm.returncode == 0, from_pcm.stderr
    # 24 kHz while clients expect RELAY_SAMPLE_RATE (16 kHz by default): queued, with a warning.
    assert "hello.wav is 24000 Hz but RELAY_SAMPLE_RATE is 16000" in from_wav.stderr
    assert "warning" not in from_pcm.stderr
    long_clip = tone(2.5)  # over 64 KB: stored beside its queue entry
    (tmp_path / "long.pcm").write_bytes(long_clip)
    from_long = await cli(settings, "enqueue", "conv-cli", str(tmp_path / "long.pcm"),
                          "--rate", "16000", "--turn-id", "t-long")
    assert from_long.returncode == 0, from_long.stderr
    rows = await redis_client.xrange(keys.queue("conv-cli"))
    jobs = [decode_job(f, audio=await redis_client.get(keys.queued_audio(
        "conv-cli", f[b"turn"].decode()))) for _, f in rows]
    assert [(j.turn_id, j.sample_rate, j.avatar_id, j.pcm) for j in jobs] == [
        ("t-wav", 24000, "av-1", clip), (from_pcm.stdout.strip(), 16000, None, clip),
        ("t-long", 16000, None, long_clip)]
    listing = await cli(settings, "jobs", "--json")
    queued = json.loads(listing.stdout)["queued"]
    assert [(r["turn"], r["state"], r["audio_s"]) for r in queued] == [
        ("t-wav", "queued", 0.2), (from_pcm.stdout.strip(), "queued", 0.3),
        ("t-long", "queued", 2.5)]


async def test_enqueue_refuses_what_it_cannot_send(settings, tmp_path):
    write_wav(tmp_path / "stereo.wav", tone(0.1) * 2, channels=2)
    (tmp_path / "raw.pcm").write_bytes(tone(0.1))
    (tmp_path / "odd.mp3").write_bytes(b"ID3")
    cases = [
        ((str(tmp_path / "stereo.wav"),), "only mono"),
        ((str(tmp_path / "raw.pcm"),), "needs --rate"),
        ((str(tmp_path / "raw.pcm"), "--rate", "11025"), "is not one of"),
        ((str(tmp_path / "odd.mp3"),), "expected a .wav"),
        # A missing file is an argument error, not "redis unavailable".
        ((str(tmp_path / "missing.wav"),), "missing.wav: no such file"),
        ((str(tmp_path),), "not a regular file"),
        ((str(tmp_path / "raw.pcm"), "--rate", "-5"), "argument --rate: -5 must be positive"),
    ]
    for args, message in cases:
        result = await cli(settings, "enqueue", "conv-bad", *args)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr)
        assert "redis unavailable" not in result.stderr and "Traceback" not in result.stderr


async def test_jobs_drop_without_an_id_is_a_usage_error(settings):
    result = await cli(settings, "jobs", "drop")
    assert result.returncode == 2
    assert "relay jobs: error: drop needs a dead letter id" in result.stderr
    assert "configuration error" not in result.stderr


async def test_dead_letters_listed_dropped_and_requeued(settings, redis_client, keys, tmp_path,
                                                        run_worker):
    clip = tone(0.3, freq=330.0)
    write_wav(tmp_path / "late.wav", clip)
    for turn in ("late-1", "late-2"):
        result = await cli(settings, "enqueue", "conv-dead", str(tmp_path / "late.wav"),
                           "--deadline", "0.05", "--turn-id", turn)
        assert result.returncode == 0, result.stderr
    await asyncio.sleep(0.2)
    await run_worker()
    dead = DeadLetters(redis_client, keys, maxlen=10)
    async with asyncio.timeout(5):
        while await dead.count() < 2:
            await asyncio.sleep(0.05)
    first, second = await dead.list()
    # Buried self-contained (the clip inside the job), the queue's copies gone with the turns.
    assert decode_job({b"job": first.job}).pcm == clip
    assert not await redis_client.exists(keys.queued_audio("conv-dead", "late-1"))
    listing = await cli(settings, "jobs")
    assert "DEAD LETTERS (2" in listing.stdout and "deadline" in listing.stdout
    assert first.entry_id in listing.stdout

    requeued = await cli(settings, "jobs", "requeue", first.entry_id)
    assert requeued.returncode == 0, requeued.stderr
    new_turn = requeued.stdout.strip().split()[-3]
    messages = await wait_turn_end(redis_client, keys, "conv-dead", new_turn)
    assert_complete(messages, new_turn, clip)
    dropped = await cli(settings, "jobs", "drop", second.entry_id)
    assert dropped.returncode == 0 and await dead.count() == 0
    missing = await cli(settings, "jobs", "drop", second.entry_id)
    assert missing.returncode == 2 and "no dead letter" in missing.stderr


async def test_a_version_2_dead_letter_is_requeued_with_the_clip_beside_its_old_entry(
    settings, redis_client, keys, run_worker,
):
    # As a producer older than version 2 jobs buries one: the job as queued, without its clip,
    # which still waits beside the old queue entry.
    clip = tone(0.3, freq=440.0)
    job = TurnJob(kind=KIND_CLIP, conversation_id="conv-v2", turn_id="old", sample_rate=RATE,
                  avatar_id=None, submitted_ms=0)
    await redis_client.set(keys.queued_audio("conv-v2", "old"), clip)
    dead = DeadLetters(redis_client, keys, maxlen=10)
    await dead.bury(conversation_id="conv-v2", turn_id="old", reason="malformed",
                    error="unsupported job version 2", job=job.encode())
    [letter] = await dead.list()
    await run_worker()
    requeued = await cli(settings, "jobs", "requeue", letter.entry_id)
    assert requeued.returncode == 0, requeued.stderr
    new_turn = requeued.stdout.strip().split()[-3]
    assert_complete(await wait_turn_end(redis_client, keys, "conv-v2", new_turn), new_turn, clip)
