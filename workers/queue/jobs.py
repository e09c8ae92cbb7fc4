"""The job codec: a turn as the versioned msgpack map stored in a conversation's queue.

    {"v": 1 | 2, "kind": "clip" | "stream", "conv": str, "turn": str, "rate": int,
     "avatar": str | None, "pcm": bytes (v1 clip only), "at": submit time in unix ms}

Version 2 (what ``TurnQueue`` writes for clips over ``INLINE_CLIP_MAX``) leaves a clip's PCM out of
the map: it waits beside the queue entry, under ``Keys.queued_audio`` (``workers.queue.records``),
and is given to ``decode_job`` separately. Version 1 carries it inline (smaller clips, streamed
turns, jobs of older submitters); dead letters keep that form (``encode(inline=True)``), so they
hold their audio whatever happens to the queue.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgpack

from relay.keys import validate_conversation_id, validate_turn_id
from workers.errors import MalformedJob
from workers.speech.pcm import validate_pcm, validate_sample_rate

JOB_VERSION = 2  # written by submitters; producers read 1 and 2
INLINE_VERSION = 1  # a clip's PCM inside the map
KIND_CLIP = "clip"
KIND_STREAM = "stream"
JOB_FIELD = b"job"
INPUT_AUDIO = b"a"
INPUT_END = b"end"
DEFAULT_MAX_JOBS = 10_000
MAX_CLIP_BYTES = 8 * 1024 * 1024  # about 87 s at 48 kHz; longer speech belongs in a streamed turn
MAX_CHUNK_BYTES = 1024 * 1024
# Clips up to this size travel inside their job (version 1), larger ones beside it (version 2).
# Up to here the clip through the queue's scripts costs Redis little more than storing it apart
# (relay bench --queue-cost, 31 KB: 0.9 to 1.4 times the time; 1.8 times the instructions, but
# those are hashing and copying loops: 1.07 times the CPU, docs/benchmarks.md "Queue cost"), and
# inside the job the worker needs no read of its own (every clip stored apart put 2 ms on the
# latency bench's p50 at 20 conversations); above it, every KB through a script holds Redis
# longer (93 KB: 2 to 4 times).
INLINE_CLIP_MAX = 64 * 1024


@dataclass(frozen=True)
class TurnJob:
    kind: str
    conversation_id: str
    turn_id: str
    sample_rate: int
    avatar_id: str | None
    submitted_ms: int
    pcm: bytes | None = None  # clip jobs only

    def encode(self, *, inline: bool = False) -> bytes:
        """The map without the clip's PCM (v2; the PCM is stored apart), or with it
        (``inline``: v1, self-contained, as dead letters keep it)."""
        body: dict[str, Any] = {
            "v": INLINE_VERSION if inline else JOB_VERSION, "kind": self.kind,
            "conv": self.conversation_id, "turn": self.turn_id, "rate": self.sample_rate,
            "avatar": self.avatar_id, "at": self.submitted_ms,
        }
        if inline and self.kind == KIND_CLIP:
            body["pcm"] = self.pcm
        packed: bytes = msgpack.packb(body, use_bin_type=True)
        return packed


def decode_job(fields: Mapping[bytes, bytes], audio: bytes | None = None) -> TurnJob:
    """The job in a jobs-stream entry; MalformedJob for anything that is not a valid job.

    ``audio``: a v2 clip's PCM, read from beside its queue entry; a v2 clip job without it
    decodes with ``pcm`` None (its audio is gone: expired, or the turn left the queue), which
    is enough for what the job says about its session (avatar, sample rate), not to play it."""
    raw = fields.get(JOB_FIELD)
    if raw is None:
        raise MalformedJob("entry has no job field")
    try:
        body = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except (ValueError, TypeError) as exc:
        raise MalformedJob("job is not valid msgpack") from exc
    if not isinstance(body, dict):
        raise MalformedJob("job is not a msgpack map")
    version = body.get("v")
    if version not in (INLINE_VERSION, JOB_VERSION):
        raise MalformedJob(f"unsupported job version {version!r}")
    if version == JOB_VERSION and body.get("kind") == KIND_CLIP:
        if "pcm" in body:
            raise MalformedJob("a version 2 job carries no pcm")
        body["pcm"] = audio
    try:
        return _job_from(body)
    except (KeyError, TypeError, ValueError) as exc:
        raise MalformedJob(f"invalid job: {exc}") from exc


def _job_from(body: dict[str, Any]) -> TurnJob:
    kind = body["kind"]
    if kind not in (KIND_CLIP, KIND_STREAM):
        raise ValueError(f"unknown job kind {kind!r}")
    avatar = body.get("avatar")
    if avatar is not None and not isinstance(avatar, str):
        raise TypeError("avatar must be a string")
    pcm = body["pcm"] if kind == KIND_CLIP else None
    if pcm is not None:  # None: a v2 clip whose audio was not given (see decode_job)
        pcm = validate_pcm(pcm, allow_empty=False)
    return TurnJob(
        kind=kind,
        conversation_id=validate_conversation_id(body["conv"]),
        turn_id=validate_turn_id(body["turn"]),
        sample_rate=validate_sample_rate(body["rate"]),
        avatar_id=avatar,
        submitted_ms=int(body.get("at", 0)),
        pcm=pcm,
    )
