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


# One fenced append call takes the audio entries of at most this many chunks (and at most this
# many bytes of audio, but always at least one chunk); more are split into further calls. Bounds
# one call's size. Here rather than in ``workers.speech.turn`` because the submit, which cannot
# import the SDK, builds a turn's first write too.
AUDIO_BATCH_MAX = 32
AUDIO_BATCH_MAX_BYTES = 512 * 1024

# A clip's first call appends this much audio: the client holds it while the rest of the clip
# waits (at most ``workers.speech.turn.MOTION_OPEN_GRACE_S``) for other turns' first audio.
FIRST_AUDIO_S = 0.2


def first_audio_chunks(chunk_ms: int) -> int:
    """How many chunks a clip's first call carries: ``FIRST_AUDIO_S`` of them, but never more
    than one append call takes (below 7 ms chunks, ``AUDIO_BATCH_MAX`` chunks, less audio).
    The byte bound needs no check: 0.2 s is at most 38 KB at 48 kHz, or a single chunk."""
    return min(AUDIO_BATCH_MAX, max(1, round(FIRST_AUDIO_S * 1000 / chunk_ms)))


def clip_head(pcm: bytes, *, sample_rate: int, chunk_ms: int) -> tuple[list[bytes], bytes]:
    """The clip's first ``first_audio_chunks`` chunks of ``chunk_ms`` (empty for no audio), and
    the rest of the clip: what a turn's opening write carries, whoever makes it (a worker, or
    the submit itself)."""
    size = chunk_size(sample_rate, chunk_ms)
    head = pcm[: size * first_audio_chunks(chunk_ms)]
    return list(split_pcm(head, size)), pcm[len(head) :]


def split_pcm(pcm: bytes, size: int) -> Iterator[bytes]:
    for start in range(0, len(pcm), size):
        yield pcm[start : start + size]


def pcm_seconds(num_bytes: int, sample_rate: int) -> float:
    return num_bytes / (2 * sample_rate)
