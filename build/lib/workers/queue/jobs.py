"""The job codec: a turn as the versioned msgpack map stored in a conversation's queue.

    {"v": 1, "kind": "clip" | "stream", "conv": str, "turn": str, "rate": int,
     "avatar": str | None, "pcm": bytes (clip only), "at": submit time in unix ms}
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgpack

from relay.keys import validate_conversation_id, validate_turn_id
from workers.errors import MalformedJob
from workers.speech.pcm import validate_pcm, validate_sample_rate

JOB_VERSION = 1
KIND_CLIP = "clip"
KIND_STREAM = "stream"
JOB_FIELD = b"job"
INPUT_AUDIO = b"a"
INPUT_END = b"end"
DEFAULT_MAX_JOBS = 10_000
MAX_CLIP_BYTES = 8 * 1024 * 1024  # about 87 s at 48 kHz; longer speech belongs in a streamed turn
MAX_CHUNK_BYTES = 1024 * 1024


@dataclass(frozen=True)
class TurnJob:
    kind: str
    conversation_id: str
    turn_id: str
    sample_rate: int
    avatar_id: str | None
    submitted_ms: int
    pcm: bytes | None = None  # clip jobs only

    def encode(self) -> bytes:
        body: dict[str, Any] = {
            "v": JOB_VERSION, "kind": self.kind, "conv": self.conversation_id,
            "turn": self.turn_id, "rate": self.sample_rate, "avatar": self.avatar_id,
            "at": self.submitted_ms,
        }
        if self.kind == KIND_CLIP:
            body["pcm"] = self.pcm
        packed: bytes = msgpack.packb(body, use_bin_type=True)
        return packed


def decode_job(fields: Mapping[bytes, bytes]) -> TurnJob:
    """The job in a jobs-stream entry; MalformedJob for anything that is not a valid job."""
    raw = fields.get(JOB_FIELD)
    if raw is None:
        raise MalformedJob("entry has no job field")
    try:
        body = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except (ValueError, TypeError) as exc:
        raise MalformedJob("job is not valid msgpack") from exc
    if not isinstance(body, dict):
        raise MalformedJob("job is not a msgpack map")
    if body.get("v") != JOB_VERSION:
        raise MalformedJob(f"unsupported job version {body.get('v')!r}")
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
    pcm = validate_pcm(body["pcm"], allow_empty=False) if kind == KIND_CLIP else None
    return TurnJob(
        kind=kind,
        conversation_id=validate_conversation_id(body["conv"]),
        turn_id=validate_turn_id(body["turn"]),
        sample_rate=validate_sample_rate(body["rate"]),
        avatar_id=avatar,
        submitted_ms=int(body.get("at", 0)),
        pcm=pcm,
    )
