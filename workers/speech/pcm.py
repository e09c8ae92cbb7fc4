"""PCM16 mono audio rules shared by the producer and the queue (no SDK import: submit needs it)."""

from __future__ import annotations

from collections.abc import Iterator

from relay.settings import SAMPLE_RATES


def validate_sample_rate(sample_rate: int) -> int:
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, int):
        raise TypeError("sample_rate must be an int")
    if sample_rate not in SAMPLE_RATES:
        raise ValueError(f"sample_rate must be one of {sorted(SAMPLE_RATES)}, not {sample_rate}")
    return sample_rate


def validate_pcm(data: bytes | bytearray | memoryview, *, allow_empty: bool = True) -> bytes:
    """PCM16 mono little-endian as immutable bytes; whole samples only."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"audio must be bytes of PCM16, not {type(data).__name__}")
    pcm = bytes(data)
    if len(pcm) % 2:
        raise ValueError(f"PCM16 audio needs an even number of bytes, got {len(pcm)}")
    if not pcm and not allow_empty:
        raise ValueError("audio clip is empty")
    return pcm


def chunk_size(sample_rate: int, chunk_ms: int) -> int:
    """Bytes of PCM16 mono in ``chunk_ms`` (at least one sample)."""
    return max(2, sample_rate * chunk_ms // 1000 * 2)


# A clip's first call appends this much audio: the client holds it while the rest of the clip
# waits (at most ``workers.speech.turn.MOTION_OPEN_GRACE_S``) for other turns' first audio.
FIRST_AUDIO_S = 0.2


def clip_head(pcm: bytes, *, sample_rate: int, chunk_ms: int) -> tuple[list[bytes], bytes]:
    """The first ``FIRST_AUDIO_S`` of a clip in ``chunk_ms`` chunks (empty for no audio), and the
    rest of the clip: what a turn's opening write carries, whoever makes it (a worker, or the
    submit itself)."""
    size = chunk_size(sample_rate, chunk_ms)
    count = max(1, round(FIRST_AUDIO_S * 1000 / chunk_ms))
    head = pcm[: size * count]
    return list(split_pcm(head, size)), pcm[len(head) :]


def split_pcm(pcm: bytes, size: int) -> Iterator[bytes]:
    for start in range(0, len(pcm), size):
        yield pcm[start : start + size]


def pcm_seconds(num_bytes: int, sample_rate: int) -> float:
    return num_bytes / (2 * sample_rate)
