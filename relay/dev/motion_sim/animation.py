"""Deterministic stand-in animation: FLAME keyframes derived from PCM16LE mono audio.

The real Motion Server emits 25 keyframes per second of audio, each 120 float32 values laid out as
translation 3, rotation 3, neck_pose 3, jaw_pose 3, eye_pose 6, eye_lid 2 and expression 100.
The simulator keeps that shape and rate. Each keyframe is a pure function of one window of
``sample_rate // 25`` samples, so the output for a clip does not depend on how the audio was
chunked: windows sit at fixed offsets from the start of the request. RMS energy opens the jaw and
scales the expression, the zero-crossing rate and a CRC of the window bytes vary the rest.
"""

from __future__ import annotations

import math
import operator
import sys
import zlib
from array import array
from dataclasses import dataclass

from relay.dev.motion_sim import proto

FPS = 25
KEYFRAME_SIZE = 120
_SEGMENT_SIZES = (3, 3, 3, 3, 6, 2, 100)  # one per proto.FLAME_FIELDS entry, in order
_SEGMENTS: tuple[tuple[str, int, int], ...] = tuple(
    (name, sum(_SEGMENT_SIZES[:i]), sum(_SEGMENT_SIZES[: i + 1]))
    for i, name in enumerate(proto.FLAME_FIELDS)
)
_INT16_SCALE = 32768.0
_BLINK_PERIOD = 40  # CRC buckets; on varied audio the lids close in about 1 window in 40

Keyframe = list[float]


# Translates a PCM16LE sample's high byte to its sign bit (0 or 1).
_SIGN_OF_HIGH_BYTE = bytes(128) + bytes([1]) * 128
# Per expression coefficient i: 0.37 * i and cos(0.21 * i), the same floats the formula in
# ``keyframe_from_window`` computes inline, taken once.
_EXPRESSION_SHIFT = tuple(0.37 * i for i in range(_SEGMENT_SIZES[-1]))
_EXPRESSION_TILT = tuple(math.cos(0.21 * i) for i in range(_SEGMENT_SIZES[-1]))


def _even(window: bytes) -> bytes:
    return window[: len(window) - len(window) % 2]


def _rms(window: bytes) -> float:
    """RMS of the window's samples over full scale. ``map(mul)`` sums in C; the integer sum and
    the division are exactly those of the per-sample loop it replaced."""
    samples = array("h", _even(window))
    if not samples:
        return 0.0
    if sys.byteorder == "big":
        samples.byteswap()  # the wire format is little-endian
    return math.sqrt(sum(map(operator.mul, samples, samples)) / len(samples)) / _INT16_SCALE


def _zero_crossing_rate(window: bytes) -> float:
    """Sign changes between neighbouring samples, per neighbour pair. The sign is the top bit of
    each sample's high byte, so the count is a popcount of two byte strings XORed: it does in
    C what a loop over 640 samples took 70 us for in Python (the simulator's largest cost)."""
    signs = _even(window)[1::2].translate(_SIGN_OF_HIGH_BYTE)
    if len(signs) < 2:
        return 0.0
    changed = int.from_bytes(signs[:-1], "little") ^ int.from_bytes(signs[1:], "little")
    return changed.bit_count() / (len(signs) - 1)


def keyframe_from_window(window: bytes) -> Keyframe:
    """One keyframe from one window of PCM16LE bytes; values are float32-exact and in [-1, 1]."""
    opening = min(1.0, 4.0 * _rms(window))  # speech RMS is a small fraction of full scale
    tilt = 2.0 * _zero_crossing_rate(window) - 1.0
    checksum = zlib.crc32(window)
    phase = checksum / 2**32 * math.tau
    gaze = [0.1 * math.sin(phase + 5.0), 0.1 * math.cos(phase + 5.0), 0.0]
    lids = 1.0 if checksum % _BLINK_PERIOD == 0 else 0.0
    values = [
        0.01 * math.sin(phase), 0.01 * math.cos(phase), 0.005 * tilt,  # translation
        0.05 * math.sin(phase + 1.0), 0.05 * math.cos(phase + 2.0), 0.02 * tilt,  # rotation
        0.03 * math.sin(phase + 3.0), 0.03 * math.cos(phase + 4.0), 0.0,  # neck_pose
        0.5 * opening, 0.0, 0.0,  # jaw_pose
        *gaze, *gaze,  # eye_pose, both eyes alike
        lids, lids,  # eye_lid
    ]  # fmt: skip
    # Expression i: 0.6 * opening * sin(phase + 0.37 * i) + 0.4 * tilt * cos(0.21 * i).
    amplitude, lean = 0.6 * opening, 0.4 * tilt
    values += [amplitude * math.sin(phase + shift) + lean * cos_i
               for shift, cos_i in zip(_EXPRESSION_SHIFT, _EXPRESSION_TILT, strict=True)]
    # Round through float32 now so the reference equals what survives the wire.
    return array("f", values).tolist()


class KeyframeGenerator:
    """Turns a stream of PCM16LE chunks into keyframes, one per complete window.

    Audio is buffered (``push``) and keyframes are made when taken (``take``): in real-time mode
    the server animates at playback pace, so a clip sent whole costs its keyframes spread over
    its playback instead of all at once when it arrives. (Made on arrival, a round of 100
    one-second clips cost the simulator 250 ms of CPU in one go, on the machine that also runs
    the relay being measured.) ``feed`` and ``finish`` are push-and-take-everything.
    """

    def __init__(self, sample_rate: int) -> None:
        if sample_rate < FPS:
            raise ValueError(f"sample rate too low: {sample_rate}")
        self._window = 2 * (sample_rate // FPS)
        self._buffer = bytearray()
        self._start = 0  # bytes of the buffer already made into keyframes
        self._ended = False

    @property
    def available(self) -> int:
        """Keyframes that can be taken now: complete windows, plus the partial tail once ended."""
        count, tail = divmod(len(self._buffer) - self._start, self._window)
        return count + (1 if self._ended and tail else 0)

    def push(self, pcm: bytes) -> None:
        if self._ended:
            raise RuntimeError("audio after the end")
        self._buffer += pcm

    def end(self) -> None:
        """No more audio: the final partial window counts as one keyframe when non-empty."""
        self._ended = True

    def take(self, count: int) -> list[Keyframe]:
        """The next ``count`` keyframes (at most ``available``), in order."""
        window, start = self._window, self._start
        stop = min(len(self._buffer), start + max(0, min(count, self.available)) * window)
        view = memoryview(self._buffer)
        try:
            keyframes = [keyframe_from_window(bytes(view[at : min(at + window, stop)]))
                         for at in range(start, stop, window)]
        finally:
            view.release()  # a live view would forbid resizing the buffer below
        self._start = stop
        if self._start >= len(self._buffer) // 2:  # drop what was taken, in amortised O(1)
            del self._buffer[: self._start]
            self._start = 0
        return keyframes

    def feed(self, pcm: bytes) -> list[Keyframe]:
        self.push(pcm)
        return self.take(self.available)

    def finish(self) -> list[Keyframe]:
        self.end()
        return self.take(self.available)


def keyframes_for_audio(pcm: bytes, sample_rate: int) -> list[Keyframe]:
    """Every keyframe for a complete clip: the reference the server's stream must equal."""
    generator = KeyframeGenerator(sample_rate)
    return generator.feed(pcm) + generator.finish()


def encode_animation(
    connection_id: str, req_id: str, *, end: bool, keyframes: list[Keyframe]
) -> bytes:
    """Serialize one ``ServerResponseAnimation`` envelope (``Message`` type 5)."""
    message = proto.Message(type=proto.MessageType.SERVER_RESPONSE_ANIMATION)
    body = message.server_response_animation
    body.connection_id = connection_id
    body.req_id = req_id
    body.end = end
    body.animation.SetInParent()  # present even when empty, like the production server
    for keyframe in keyframes:
        flame = body.animation.keyframes.add()
        for name, start, stop in _SEGMENTS:
            getattr(flame, name).extend(keyframe[start:stop])
    result: bytes = message.SerializeToString()
    return result


@dataclass(frozen=True)
class AnimationBatch:
    msg_type: int
    connection_id: str
    req_id: str
    end: bool
    keyframes: list[Keyframe]


def _flatten(flame: object) -> Keyframe:
    keyframe = [value for name, _, _ in _SEGMENTS for value in getattr(flame, name)]
    if len(keyframe) != KEYFRAME_SIZE:
        raise ValueError(f"keyframe has {len(keyframe)} values, expected {KEYFRAME_SIZE}")
    return keyframe


def decode_animation(envelope: bytes) -> AnimationBatch:
    """Parse a serialized envelope as handed to ``transport_frames``; it must be type 5."""
    message = proto.Message()
    message.ParseFromString(envelope)
    if message.type != proto.MessageType.SERVER_RESPONSE_ANIMATION:
        raise ValueError(f"not an animation message: type={message.type}")
    body = message.server_response_animation
    return AnimationBatch(
        msg_type=message.type,
        connection_id=body.connection_id,
        req_id=body.req_id,
        end=body.end,
        keyframes=[_flatten(flame) for flame in body.animation.keyframes],
    )
