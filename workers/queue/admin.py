"""What ``relay enqueue`` and ``relay jobs`` do: queue a turn from a file, list and fix the queue.

Listing needs no index of its own: every conversation with queued turns has at least one doorbell
in ``Keys.jobs`` (unread, or pending for the worker running it), so the doorbells name the
conversations whose queues to read.
"""

from __future__ import annotations

import json
import time
import wave
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from relay.errors import RelayError
from relay.keys import Keys
from relay.redis_conn import RedisClient, client_for
from relay.settings import SAMPLE_RATES, Settings
from workers.errors import MalformedJob, QueueError
from workers.queue.deadletters import DeadLetter, DeadLetters
from workers.queue.doorbells import waiting_conversations
from workers.queue.jobs import KIND_CLIP, decode_job
from workers.queue.records import JobStore
from workers.queue.submit import TurnQueue

_LIST_LIMIT = 10_000  # doorbells read to find conversations; far above any sane backlog


class AudioFileError(RelayError):
    """An audio file ``relay enqueue`` cannot send."""


def read_audio(path: Path, rate: int | None) -> tuple[bytes, int]:
    """PCM16 mono audio and its rate: from a .wav header, or raw .pcm with ``rate``."""
    if not path.is_file():
        raise AudioFileError(f"{path}: no such file" if not path.exists() else
                             f"{path}: not a regular file")
    suffix = path.suffix.lower()
    if suffix == ".wav":
        return _read_wav(path, rate)
    if suffix in (".pcm", ".raw"):
        if rate is None:
            raise AudioFileError("raw PCM needs --rate (samples per second)")
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise AudioFileError(f"{path}: {exc.strerror or exc}") from exc
        return _checked(data, rate)
    raise AudioFileError(f"{path.name}: expected a .wav or a raw .pcm file")


def _read_wav(path: Path, rate: int | None) -> tuple[bytes, int]:
    try:
        with wave.open(str(path), "rb") as audio:
            if audio.getcomptype() != "NONE" or audio.getsampwidth() != 2:
                raise AudioFileError(f"{path.name}: only uncompressed 16-bit PCM is supported")
            if audio.getnchannels() != 1:
                raise AudioFileError(f"{path.name}: only mono is supported, "
                                     f"not {audio.getnchannels()} channels")
            header_rate = audio.getframerate()
            pcm = audio.readframes(audio.getnframes())
    except (wave.Error, EOFError) as exc:
        raise AudioFileError(f"{path.name}: not a readable WAV file ({exc})") from exc
    except OSError as exc:  # unreadable (permissions), vanished since the check
        raise AudioFileError(f"{path}: {exc.strerror or exc}") from exc
    if rate is not None and rate != header_rate:
        raise AudioFileError(f"{path.name} is {header_rate} Hz, not the --rate {rate}")
    return _checked(pcm, header_rate)


def _checked(pcm: bytes, rate: int) -> tuple[bytes, int]:
    if rate not in SAMPLE_RATES:
        raise AudioFileError(f"sample rate {rate} is not one of {sorted(SAMPLE_RATES)}")
    if not pcm or len(pcm) % 2:
        raise AudioFileError("the audio is empty or not whole 16-bit samples")
    return pcm, rate


async def enqueue(settings: Settings, conversation_id: str, path: Path, *, rate: int | None,
                  avatar_id: str | None, deadline_s: float | None, turn_id: str | None,
                  warn: Callable[[str], None] = print) -> str:
    """Queue the file as one clip turn; returns its turn id. ``warn`` hears of a sample rate
    other than RELAY_SAMPLE_RATE: the client SDK's audio format must match the turn's rate."""
    pcm, sample_rate = read_audio(path, rate)
    if sample_rate != settings.sample_rate:
        warn(f"{path.name} is {sample_rate} Hz but RELAY_SAMPLE_RATE is {settings.sample_rate}: "
             f"clients whose SDK audio format is {settings.sample_rate} Hz will play it wrong "
             "(resample the file, or set RELAY_SAMPLE_RATE to the clients' rate)")
    client = client_for(settings)
    try:
        queue = TurnQueue.from_settings(settings, client)
        return await queue.submit_clip(conversation_id, pcm, sample_rate=sample_rate,
                                       avatar_id=avatar_id, turn_id=turn_id,
                                       deadline_s=deadline_s)
    except ValueError as exc:
        raise AudioFileError(str(exc)) from exc
    finally:
        await client.aclose()


@dataclass(frozen=True)
class QueuedRow:
    conversation: str
    turn: str
    state: str  # "running" or "queued"
    attempts: int
    kind: str
    audio_s: float | None
    waited_s: float | None
    runner: str | None


async def queued_turns(client: RedisClient, keys: Keys, settings: Settings) -> list[QueuedRow]:
    store = JobStore(client, keys, ttl_s=settings.job_ttl_s, lease_s=1.0)
    result = []
    for conversation in await waiting_conversations(client, keys, limit=_LIST_LIMIT):
        attempts = await store.attempts(conversation)
        running_turn = await store.running_turn(conversation)
        runner = await store.runner(conversation)
        for turn in await store.queued(conversation):
            stored = await store.audio_bytes(conversation, turn.turn_id)
            result.append(_row(conversation, turn.turn_id, turn.job, attempts,
                               runner if turn.turn_id == running_turn else None, stored))
    return result


def _row(conversation: str, turn_id: str, raw_job: bytes, attempts: dict[str, int],
         runner: str | None, stored_audio: int = 0) -> QueuedRow:
    """``stored_audio``: bytes of the turn's clip kept beside its entry (version 2 jobs)."""
    running = runner is not None
    kind, audio_s, waited_s = "?", None, None
    try:
        job = decode_job({b"job": raw_job})
        kind = job.kind
        clip_bytes = len(job.pcm) if job.pcm else stored_audio
        if job.kind == KIND_CLIP and clip_bytes:
            audio_s = clip_bytes / (2 * job.sample_rate)
        waited_s = round(time.time() - job.submitted_ms / 1000, 1) if job.submitted_ms else None
    except MalformedJob:
        pass
    return QueuedRow(conversation=conversation, turn=turn_id,
                     state="running" if running else "queued",
                     attempts=attempts.get(turn_id, 0), kind=kind,
                     audio_s=round(audio_s, 2) if audio_s else None, waited_s=waited_s,
                     runner=runner)


async def list_jobs(settings: Settings, *, as_json: bool, out: Callable[[str], None]) -> int:
    client = client_for(settings)
    try:
        keys = Keys.of(settings)
        queued = await queued_turns(client, keys, settings)
        dead = await DeadLetters(client, keys, maxlen=settings.dead_letter_maxlen).list()
    finally:
        await client.aclose()
    if as_json:
        out(json.dumps({"queued": [asdict(r) for r in queued],
                        "dead": [_dead_json(d) for d in dead]}, indent=2))
        return 0
    out(f"QUEUED AND RUNNING TURNS ({len(queued)})")
    out(_table(["conversation", "turn", "state", "attempts", "kind", "audio_s", "waited_s",
                "runner"], [list(asdict(r).values()) for r in queued]))
    out(f"\nDEAD LETTERS ({len(dead)}; newest last; drop or requeue by id)")
    out(_table(["id", "conversation", "turn", "reason", "attempts", "error"],
               [[d.entry_id, d.conversation_id, d.turn_id, d.reason, d.attempts, d.error[:60]]
                for d in dead]))
    return 0


def _dead_json(letter: DeadLetter) -> dict[str, Any]:
    body = asdict(letter)
    body.pop("job")
    return body


def _table(header: list[str], rows: list[list[Any]]) -> str:
    cells = [header] + [["-" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip()
                     for row in cells)


async def fix_dead_letter(settings: Settings, action: str, entry_id: str) -> str:
    """``drop`` a dead letter, or ``requeue`` it as a new turn at the end of its conversation's
    queue (a new turn id: the old one may have been partly played and interrupted)."""
    client = client_for(settings)
    try:
        keys = Keys.of(settings)
        dead = DeadLetters(client, keys, maxlen=settings.dead_letter_maxlen)
        letter = await dead.get(entry_id)
        if letter is None:
            raise QueueError(f"no dead letter {entry_id}")
        message = f"dropped {entry_id}"
        if action == "requeue":
            try:
                # A version 2 job buried by a producer that kept no copy of its clip (one older
                # than that version): the clip may still wait beside its old queue entry.
                stored = await client.get(keys.queued_audio(letter.conversation_id,
                                                            letter.turn_id))
                job = decode_job({b"job": letter.job},
                                 audio=bytes(stored) if stored is not None else None)
            except (MalformedJob, ValueError) as exc:
                raise QueueError(f"dead letter {entry_id} holds no valid job: {exc}") from exc
            turn_id = await TurnQueue.from_settings(settings, client).resubmit(job)
            message = f"requeued {entry_id} as turn {turn_id} of {job.conversation_id}"
        await dead.drop(entry_id)
        return message
    finally:
        await client.aclose()
