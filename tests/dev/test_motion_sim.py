"""The Motion Server simulator driven by the unmodified Spatius SDK over real sockets."""

from __future__ import annotations

import asyncio
import itertools
import math
import random
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
import spatius
import websockets
from spatius import AvatarSDKError, AvatarSDKErrorCode, SessionTokenError
from spatius.proto.generated import message_pb2

from relay.dev.motion_sim import (
    KEYFRAME_SIZE,
    SIM_KEY,
    AnimationBatch,
    FaultKind,
    FaultRule,
    KeyframeGenerator,
    MotionSim,
    SimConfig,
    animation,
    bound_port,
    decode_animation,
    encode_animation,
    keyframes_for_audio,
    proto,
    serve,
)

spatius.configure_telemetry("")  # before any session exists; keeps tests off the network

API_KEY = "sim-test-key"
APP_ID = "app-test"
AVATAR_ID = "avatar-test"
RATE = 16000
CHUNK_BYTES = RATE * 2 * 40 // 1000  # 40 ms of PCM16 mono
WAIT_S = 5.0  # upper bound for anything that should happen promptly
QUIET_S = 0.3  # how long "nothing more arrives" is watched


def make_clip(seconds: float, rate: int = RATE, seed: int = 7) -> bytes:
    """Speech-like PCM16LE: a wobbling tone with a syllable envelope plus a little noise."""
    rng = random.Random(seed)
    count = int(seconds * rate)
    samples = [
        int(
            9000
            * math.sin(2 * math.pi * 180 * i / rate)
            * (0.55 + 0.45 * math.sin(2 * math.pi * 4 * i / rate))
            + rng.randint(-600, 600)
        )
        for i in range(count)
    ]
    return struct.pack(f"<{count}h", *samples)


def chunks(pcm: bytes, size: int = CHUNK_BYTES) -> list[bytes]:
    return [pcm[i : i + size] for i in range(0, len(pcm), size)]


class Recorder:
    """Collects SDK callbacks and turns them into awaitable events."""

    def __init__(self) -> None:
        self.frames: list[tuple[bytes, bool]] = []
        self.errors: list[Exception] = []
        self.first_frame = asyncio.Event()
        self.last_frame = asyncio.Event()
        self.error_seen = asyncio.Event()
        self.closed = asyncio.Event()

    def on_frames(self, payload: bytes, is_last: bool) -> None:
        self.frames.append((payload, is_last))
        self.first_frame.set()
        if is_last:
            self.last_frame.set()

    def on_error(self, error: Exception) -> None:
        self.errors.append(error)
        self.error_seen.set()

    def on_close(self) -> None:
        self.closed.set()

    def batches(self, req_id: str | None = None) -> list[AnimationBatch]:
        decoded = [decode_animation(payload) for payload, _ in self.frames]
        return [b for b in decoded if req_id is None or b.req_id == req_id]

    def keyframes(self, req_id: str | None = None) -> list[list[float]]:
        return [k for batch in self.batches(req_id) for k in batch.keyframes]

    def sdk_errors(self) -> list[AvatarSDKError]:
        assert all(isinstance(e, AvatarSDKError) for e in self.errors), self.errors
        return [e for e in self.errors if isinstance(e, AvatarSDKError)]


@dataclass
class Sim:
    runner: Any
    port: int
    recorders: list[Recorder] = field(default_factory=list)

    @property
    def state(self) -> MotionSim:
        sim: MotionSim = self.runner.app[SIM_KEY]
        return sim

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def session(self, recorder: Recorder, **overrides: Any) -> spatius.AvatarSession:
        options: dict[str, Any] = {
            "api_key": API_KEY,
            "app_id": APP_ID,
            "avatar_id": AVATAR_ID,
            "sample_rate": RATE,
            "console_endpoint_url": f"{self.base_url}/v1/console",
            "ingress_endpoint_url": f"ws://127.0.0.1:{self.port}/v2/driveningress",
            "transport_frames": recorder.on_frames,
            "on_error": recorder.on_error,
            "on_close": recorder.on_close,
        }
        options.update(overrides)
        return spatius.new_avatar_session(**options)

    async def started(self, recorder: Recorder, **overrides: Any) -> spatius.AvatarSession:
        session = self.session(recorder, **overrides)
        await session.init()
        await session.start()
        return session


StartSim = Callable[..., Awaitable[Sim]]


@pytest.fixture
async def start_sim() -> AsyncIterator[StartSim]:
    runners: list[Any] = []

    async def start(**config: Any) -> Sim:
        config.setdefault("api_key", API_KEY)
        runner = await serve(SimConfig(**config), "127.0.0.1", 0)
        runners.append(runner)
        return Sim(runner, bound_port(runner))

    yield start
    for runner in runners:
        await runner.cleanup()


async def wait(event: asyncio.Event) -> None:
    await asyncio.wait_for(event.wait(), WAIT_S)


async def eventually(predicate: Callable[[], bool]) -> None:
    """Poll server-side state that has no event of its own, within a bound."""
    deadline = time.monotonic() + WAIT_S
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def stays_quiet(recorder: Recorder) -> int:
    """Frame count after watching for QUIET_S; callers compare it with the count before."""
    await asyncio.sleep(QUIET_S)
    return len(recorder.frames)


async def fetch_token(sim: Sim) -> str:
    expire_at = int(time.time()) + 600
    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"{sim.base_url}/v1/console/session-tokens",
            json={"expireAt": expire_at},
            headers={"X-Api-Key": API_KEY},
        ) as response:
            assert response.status == 200
            token: str = (await response.json())["sessionToken"]
            return token


async def raw_connect(sim: Sim) -> Any:
    token = await fetch_token(sim)
    return await websockets.connect(
        f"ws://127.0.0.1:{sim.port}/v2/driveningress/websocket?id={AVATAR_ID}",
        additional_headers={"X-App-ID": APP_ID, "X-Session-Key": token},
    )


def configure_message(sample_rate: int = RATE) -> bytes:
    message = message_pb2.Message()
    message.type = message_pb2.MESSAGE_CLIENT_CONFIGURE_SESSION
    message.client_configure_session.sample_rate = sample_rate
    return message.SerializeToString()


def parse_sdk(payload: bytes) -> Any:
    message = message_pb2.Message()
    message.ParseFromString(payload)
    return message


# Schema and animation.


def test_animation_round_trips_through_the_sdk_schema() -> None:
    keyframes = keyframes_for_audio(make_clip(0.3), RATE)
    ours = encode_animation("conn-1", "req-1", end=True, keyframes=keyframes)
    sdk = parse_sdk(ours)
    assert sdk.type == message_pb2.MESSAGE_SERVER_RESPONSE_ANIMATION
    body = sdk.server_response_animation
    assert (body.connection_id, body.req_id, body.end) == ("conn-1", "req-1", True)
    # The SDK keeps field 4 as unknown bytes, so its re-serialization is byte-identical.
    resent = sdk.SerializeToString()
    assert resent == ours
    assert decode_animation(resent).keyframes == keyframes


def test_sdk_client_messages_parse_with_the_server_schema() -> None:
    sdk = message_pb2.Message()
    sdk.type = message_pb2.MESSAGE_CLIENT_CONFIGURE_SESSION
    sdk.client_configure_session.sample_rate = 24000
    sdk.client_configure_session.extra_params["voice"] = "calm"
    sdk.client_configure_session.livekit_egress.url = "wss://lk"
    ours = proto.Message.FromString(sdk.SerializeToString())
    assert ours.client_configure_session.sample_rate == 24000
    assert dict(ours.client_configure_session.extra_params) == {"voice": "calm"}
    assert ours.SerializeToString() == sdk.SerializeToString()

    sdk = message_pb2.Message()
    sdk.type = message_pb2.MESSAGE_CLIENT_AUDIO_INPUT
    sdk.client_audio_input.req_id = "r"
    sdk.client_audio_input.audio = b"\x01\x02"
    sdk.client_audio_input.end = True
    sdk.client_audio_input.trace_context.traceparent = "00-abc-def-01"
    ours = proto.Message.FromString(sdk.SerializeToString())
    assert ours.type == proto.MessageType.CLIENT_AUDIO_INPUT
    assert ours.client_audio_input.trace_context.traceparent == "00-abc-def-01"

    sdk = message_pb2.Message()
    sdk.type = message_pb2.MESSAGE_CLIENT_INTERRUPT
    sdk.client_interrupt.req_id = "r"
    assert proto.Message.FromString(sdk.SerializeToString()).client_interrupt.req_id == "r"


def test_server_handshake_messages_parse_with_the_sdk_schema() -> None:
    ours = proto.Message(type=proto.MessageType.SERVER_ERROR)
    ours.server_error.code = 4003
    ours.server_error.message = "concurrency limit exceeded"
    sdk = parse_sdk(ours.SerializeToString())
    assert sdk.type == message_pb2.MESSAGE_SERVER_ERROR
    assert (sdk.server_error.code, sdk.server_error.message) == (4003, "concurrency limit exceeded")

    ours = proto.Message(type=proto.MessageType.SERVER_CONFIRM_SESSION)
    ours.server_confirm_session.connection_id = "c"
    ours.server_confirm_session.capabilities.append("playback_state")
    sdk = parse_sdk(ours.SerializeToString())
    assert sdk.server_confirm_session.connection_id == "c"
    assert sdk.SerializeToString() == ours.SerializeToString()


@pytest.mark.parametrize("rate", [16000, 22050, 44100])
def test_keyframes_do_not_depend_on_chunking(rate: int) -> None:
    clip = make_clip(0.61, rate)
    reference = keyframes_for_audio(clip, rate)
    assert len(reference) == math.ceil(len(clip) / 2 / (rate // 25))
    generator = KeyframeGenerator(rate)
    pieces: list[list[float]] = []
    for size in (1, 7, 333, 4096, 3):  # odd sizes split samples and windows
        pieces += generator.feed(clip[:size])
        clip = clip[size:]
    pieces += generator.feed(clip) + generator.finish()
    assert pieces == reference
    assert all(len(k) == KEYFRAME_SIZE for k in reference)
    assert all(math.isfinite(v) and -1.0 <= v <= 1.0 for k in reference for v in k)
    assert len({tuple(k) for k in reference}) > 1  # the audio actually drives the values


def test_keyframe_shortcuts_equal_the_per_sample_definitions() -> None:
    """RMS and zero-crossing rate are computed in C (map, a popcount of sign bytes); they must
    give exactly the per-sample figures, or the animation and the vectors would change."""

    def rms(samples: list[int]) -> float:
        return math.sqrt(sum(s * s for s in samples) / len(samples)) / 32768.0 if samples else 0.0

    def crossing_rate(samples: list[int]) -> float:
        if len(samples) < 2:
            return 0.0
        return sum((a < 0) != (b < 0) for a, b in itertools.pairwise(samples)) / (len(samples) - 1)

    rng = random.Random(11)
    windows = [rng.randbytes(n) for n in (0, 1, 2, 3, 4, 639, 640, 1279, 1280, 1281)]
    windows += [rng.randbytes(1280) for _ in range(200)]
    windows += [bytes(1280), b"\xff" * 1280, b"\x00\x80" * 640, b"\xff\x7f" * 640,
                b"\x00\x00\xff\xff" * 320]  # silence, -1s, extremes, alternating 0 / -1
    for window in windows:
        even = window[: len(window) - len(window) % 2]
        samples = [v for (v,) in struct.iter_unpack("<h", even)]
        assert animation._rms(window) == rms(samples)
        assert animation._zero_crossing_rate(window) == crossing_rate(samples)


def test_keyframes_are_made_when_taken() -> None:
    """Audio pushed is made into keyframes only when taken; any interleaving of pushes and takes
    gives the clip's keyframes, the partial tail counting only once the request ended."""
    rate = 16000
    clip = make_clip(0.61, rate)
    reference = keyframes_for_audio(clip, rate)
    window = 2 * (rate // 25)
    rng = random.Random(5)
    generator = KeyframeGenerator(rate)
    taken: list[list[float]] = []
    pushed = 0
    while pushed < len(clip):
        size = rng.randrange(1, 3 * window)
        generator.push(clip[pushed : pushed + size])
        pushed = min(len(clip), pushed + size)
        assert generator.available == pushed // window - len(taken)
        taken += generator.take(rng.randrange(0, 4))
    assert len(clip) % window  # the clip ends mid-window: its tail is one more keyframe
    before_end = generator.available
    generator.end()
    assert generator.available == before_end + 1
    with pytest.raises(RuntimeError):
        generator.push(b"\x00\x00")
    taken += generator.take(10**6)
    assert taken == reference
    assert generator.available == 0 and generator.take(5) == []


# Happy path and authentication.


async def test_happy_path_streams_animation_while_audio_is_sent(start_sim: StartSim) -> None:
    sim = await start_sim()
    recorder = Recorder()
    session = sim.session(recorder)
    await session.init()
    connection_id = await session.start()
    clip = make_clip(2.3)
    parts = chunks(clip)
    first_frame_before_final_send = False
    req_id = ""
    for index, part in enumerate(parts):
        final = index == len(parts) - 1
        if final:
            first_frame_before_final_send = recorder.first_frame.is_set()
        req_id = await session.send_audio(part, end=final)
        if index == 9:  # 400 ms sent: two batches' worth, so one must stream out now
            await wait(recorder.first_frame)
    await wait(recorder.last_frame)
    await session.close()

    assert first_frame_before_final_send
    for payload, is_last in recorder.frames:
        sdk = parse_sdk(payload)
        assert sdk.type == message_pb2.MESSAGE_SERVER_RESPONSE_ANIMATION
        assert sdk.server_response_animation.req_id == req_id
        assert sdk.server_response_animation.connection_id == connection_id
        assert sdk.server_response_animation.end == is_last
    assert [is_last for _, is_last in recorder.frames].count(True) == 1
    assert recorder.frames[-1][1] is True
    batches = recorder.batches()
    assert batches[-1].keyframes, "the end=true message carries keyframes"
    assert all(len(b.keyframes) == 5 for b in batches[:-1])
    assert recorder.keyframes() == keyframes_for_audio(clip, RATE)
    assert len(recorder.keyframes()) == 58  # 2.3 s at 25 fps, the half window counted
    assert recorder.errors == []
    stats = sim.state.stats
    assert stats.keyframes_sent == 58 and stats.requests_ended == 1
    assert stats.audio_bytes == len(clip)


@pytest.mark.parametrize("use_query_auth", [False, True])
async def test_header_and_query_auth(start_sim: StartSim, use_query_auth: bool) -> None:
    sim = await start_sim()
    recorder = Recorder()
    session = await sim.started(recorder, use_query_auth=use_query_auth)
    clip = make_clip(0.5)
    await session.send_audio(clip, end=True)
    await wait(recorder.last_frame)
    await session.close()
    assert recorder.keyframes() == keyframes_for_audio(clip, RATE)


async def test_zero_audio_request_gets_one_empty_end_message(start_sim: StartSim) -> None:
    sim = await start_sim()
    recorder = Recorder()
    session = await sim.started(recorder)
    await session.send_audio(b"", end=True)
    await wait(recorder.last_frame)
    assert await stays_quiet(recorder) == 1
    await session.close()
    (batch,) = recorder.batches()
    assert batch.end and batch.keyframes == []


async def test_unknown_token_is_rejected_at_upgrade(start_sim: StartSim) -> None:
    issuer, other = await start_sim(), await start_sim()
    # A token from a different server is unknown here: the real "invalid session token" path.
    session = issuer.session(
        Recorder(), ingress_endpoint_url=f"ws://127.0.0.1:{other.port}/v2/driveningress"
    )
    await session.init()
    with pytest.raises(AvatarSDKError) as caught:
        await session.start()
    assert caught.value.code is AvatarSDKErrorCode.sessionTokenInvalid
    assert caught.value.http_status == 400
    assert caught.value.raw_body == '{"message":"Invalid session token"}\n'


async def test_unknown_avatar_is_rejected_at_upgrade(start_sim: StartSim) -> None:
    sim = await start_sim(known_avatars=frozenset({"someone-else"}))
    session = sim.session(Recorder())
    await session.init()
    with pytest.raises(AvatarSDKError) as caught:
        await session.start()
    assert caught.value.code is AvatarSDKErrorCode.avatarNotFound
    assert caught.value.http_status == 404


async def test_reject_upgrade_fault(start_sim: StartSim) -> None:
    sim = await start_sim()
    sim.state.add_fault(FaultRule(FaultKind.REJECT_UPGRADE, avatar_id=AVATAR_ID))
    session = sim.session(Recorder())
    await session.init()
    with pytest.raises(AvatarSDKError) as caught:
        await session.start()
    assert caught.value.code is AvatarSDKErrorCode.sessionTokenInvalid
    retry = await sim.started(Recorder())  # the rule fired once and is gone
    await retry.close()


# Console token API.


async def test_token_error_fault_fails_init(start_sim: StartSim) -> None:
    sim = await start_sim()
    sim.state.add_fault(FaultRule(FaultKind.TOKEN_ERROR, status=503, message="maintenance"))
    with pytest.raises(SessionTokenError) as caught:
        await sim.session(Recorder()).init()
    assert caught.value.http_status == 503
    assert caught.value.code is AvatarSDKErrorCode.serverError
    assert caught.value.server_detail == "maintenance"


async def test_wrong_api_key_is_unauthorized(start_sim: StartSim) -> None:
    sim = await start_sim()
    with pytest.raises(SessionTokenError) as caught:
        await sim.session(Recorder(), api_key="wrong").init()
    assert caught.value.http_status == 401
    # The SDK maps every 401 to sessionTokenExpired.
    assert caught.value.code is AvatarSDKErrorCode.sessionTokenExpired


@pytest.mark.parametrize("offset_s", [-10, 24 * 3600 + 60])
async def test_token_expiry_outside_range_is_rejected(start_sim: StartSim, offset_s: int) -> None:
    sim = await start_sim()
    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"{sim.base_url}/v1/console/session-tokens",
            json={"expireAt": int(time.time()) + offset_s},
            headers={"X-Api-Key": API_KEY},
        ) as response:
            body = await response.json()
    assert response.status == 400
    (error,) = body["errors"]
    assert set(error) == {"id", "status", "code", "title", "detail"}
    assert error["status"] == "400"


# Handshake.


async def test_unsupported_sample_rate_fails_start(start_sim: StartSim) -> None:
    sim = await start_sim()
    session = sim.session(Recorder(), sample_rate=11025)
    await session.init()
    with pytest.raises(AvatarSDKError) as caught:
        await session.start()
    assert caught.value.code is AvatarSDKErrorCode.unsupportedSampleRate
    assert caught.value.phase == "websocket_handshake"
    assert caught.value.server_detail == "unsupported sample rate: 11025"


async def test_first_message_must_configure_the_session(start_sim: StartSim) -> None:
    sim = await start_sim()
    async with await raw_connect(sim) as ws:
        await ws.send("hello")
        error = parse_sdk(await asyncio.wait_for(ws.recv(), WAIT_S))
        assert error.type == message_pb2.MESSAGE_SERVER_ERROR
        assert error.server_error.message == "expected ClientConfigureSession message"
        with pytest.raises(websockets.ConnectionClosed):
            await asyncio.wait_for(ws.recv(), WAIT_S)
        assert ws.close_code == 1008


async def test_handshake_silence_fault(start_sim: StartSim) -> None:
    sim = await start_sim()
    sim.state.add_fault(FaultRule(FaultKind.HANDSHAKE_SILENCE))
    async with await raw_connect(sim) as ws:
        await ws.send(configure_message())
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(ws.recv(), QUIET_S)
    assert sim.state.stats.sessions_opened == 0


async def test_concurrency_cap_is_per_app(start_sim: StartSim) -> None:
    sim = await start_sim(max_concurrent_sessions=1)
    first = await sim.started(Recorder())
    beyond = sim.session(Recorder())
    await beyond.init()
    with pytest.raises(AvatarSDKError) as caught:
        await beyond.start()
    assert caught.value.server_code == "4003"
    assert caught.value.server_detail == "concurrency limit exceeded"
    async with await raw_connect(sim) as ws:  # the close code the SDK never gets to see
        await ws.send(configure_message())
        assert parse_sdk(await asyncio.wait_for(ws.recv(), WAIT_S)).server_error.code == 4003
        with pytest.raises(websockets.ConnectionClosed):
            await asyncio.wait_for(ws.recv(), WAIT_S)
        assert ws.close_code == 4003
    other_app = await sim.started(Recorder(), app_id="another-app")
    await other_app.close()
    await first.close()
    await eventually(lambda: sim.state.stats.sessions_open == 0)
    again = await sim.started(Recorder())
    await again.close()
    assert sim.state.stats.sessions_peak == 2


# Requests, interrupts and timeouts.


async def test_interrupt_stops_the_request_and_the_session_goes_on(start_sim: StartSim) -> None:
    sim = await start_sim(realtime=True)
    recorder = Recorder()
    session = await sim.started(recorder)
    first_req = await session.send_audio(make_clip(2.0), end=True)
    await wait(recorder.first_frame)
    assert await session.interrupt() == first_req
    clip = make_clip(0.3, seed=11)
    second_req = await session.send_audio(clip, end=True)
    await wait(recorder.last_frame)
    assert await stays_quiet(recorder) == len(recorder.frames)
    await session.close()

    owners = [decode_animation(payload).req_id for payload, _ in recorder.frames]
    first_count = owners.count(first_req)
    assert owners == [first_req] * first_count + [second_req] * (len(owners) - first_count)
    assert not any(b.end for b in recorder.batches(first_req))
    assert len(recorder.keyframes(first_req)) < 50
    assert recorder.keyframes(second_req) == keyframes_for_audio(clip, RATE)
    assert sim.state.stats.interrupts == 1


@pytest.mark.parametrize(
    ("code", "message", "expected"),
    [
        (13, "driven server request failed", AvatarSDKErrorCode.upstreamError),
        (4001, "credits exhausted", AvatarSDKErrorCode.creditsExhausted),
        (14, "inference server Animate failed", AvatarSDKErrorCode.egressUnavailable),
    ],
)
async def test_server_error_fault(
    start_sim: StartSim, code: int, message: str, expected: AvatarSDKErrorCode
) -> None:
    sim = await start_sim()
    sim.state.add_fault(
        FaultRule(FaultKind.SERVER_ERROR, code=code, message=message, after_keyframes=10)
    )
    recorder = Recorder()
    session = await sim.started(recorder)
    req_id = await session.send_audio(make_clip(1.0), end=True)
    await wait(recorder.error_seen)
    (error,) = recorder.sdk_errors()
    assert error.code is expected
    assert (error.req_id, error.server_code) == (req_id, str(code))
    assert len(recorder.keyframes(req_id)) == 10 and not recorder.last_frame.is_set()
    # The failed request is over, the session is not.
    clip = make_clip(0.2)
    next_req = await session.send_audio(clip, end=True)
    await wait(recorder.last_frame)
    await session.close()
    assert recorder.keyframes(next_req) == keyframes_for_audio(clip, RATE)


async def test_drop_fault_reports_connection_closed(start_sim: StartSim) -> None:
    sim = await start_sim()
    sim.state.add_fault(FaultRule(FaultKind.DROP, after_keyframes=5))
    recorder = Recorder()
    session = await sim.started(recorder)
    await session.send_audio(make_clip(1.0), end=True)
    await wait(recorder.closed)
    (error,) = recorder.sdk_errors()
    assert error.code is AvatarSDKErrorCode.connectionClosed
    assert error.close_code is None  # no close frame was ever sent
    assert len(recorder.keyframes()) == 5


async def test_close_fault_carries_code_and_reason(start_sim: StartSim) -> None:
    sim = await start_sim()
    sim.state.add_fault(FaultRule(FaultKind.CLOSE, code=4503, message="upstream unavailable"))
    recorder = Recorder()
    session = await sim.started(recorder)
    await session.send_audio(make_clip(0.4), end=True)
    await wait(recorder.closed)
    (error,) = recorder.sdk_errors()
    assert error.code is AvatarSDKErrorCode.connectionClosed
    assert (error.close_code, error.close_reason) == (4503, "upstream unavailable")
    assert recorder.frames == []


async def test_stall_fault_stops_frames_but_keeps_the_socket(start_sim: StartSim) -> None:
    sim = await start_sim()
    sim.state.add_fault(FaultRule(FaultKind.STALL, after_keyframes=5))
    recorder = Recorder()
    session = await sim.started(recorder)
    await session.send_audio(make_clip(1.0), end=True)
    await wait(recorder.first_frame)
    assert await stays_quiet(recorder) == 1
    await session.send_audio(make_clip(0.2), end=True)  # still accepted
    assert await stays_quiet(recorder) == 1
    assert not recorder.closed.is_set() and recorder.errors == []
    await session.close()


async def test_idle_timeout(start_sim: StartSim) -> None:
    sim = await start_sim(idle_timeout_s=0.3)
    recorder = Recorder()
    await sim.started(recorder)
    await wait(recorder.closed)
    (error,) = recorder.sdk_errors()  # then a clean 1000 close, which reports nothing
    assert error.code is AvatarSDKErrorCode.idleTimeout
    assert error.server_detail == "no audio input for 0.3s"


async def test_max_session_duration(start_sim: StartSim) -> None:
    sim = await start_sim(max_session_s=0.3, idle_timeout_s=0)
    recorder = Recorder()
    await sim.started(recorder)
    await wait(recorder.closed)
    limit, closed = recorder.sdk_errors()
    assert limit.code is AvatarSDKErrorCode.sessionDurationExceeded
    assert limit.server_code == "4002"
    assert closed.code is AvatarSDKErrorCode.connectionClosed
    assert closed.close_code == 4002


async def test_first_batch_delay(start_sim: StartSim) -> None:
    """The delay holds the first batch back, and ``/_sim/first-batches`` says per request how
    long the simulator really took to its first batch (what the latency bench subtracts)."""
    sim = await start_sim(first_batch_delay_ms=250)
    recorder = Recorder()
    session = await sim.started(recorder)
    sent_at = time.monotonic()
    req_id = await session.send_audio(make_clip(0.3), end=True)
    await wait(recorder.first_frame)
    seen = (time.monotonic() - sent_at) * 1000
    assert seen >= 240
    await wait(recorder.last_frame)
    await session.close()
    async with aiohttp.ClientSession(base_url=sim.base_url) as http:
        async with http.get("/_sim/first-batches") as response:
            held = (await response.json())["first_batches"]
    assert list(held) == [req_id]
    assert 250 <= held[req_id] <= seen  # counted from its first audio, not later than we saw it


async def test_shutdown_closes_sessions_cleanly(start_sim: StartSim) -> None:
    sim = await start_sim()
    recorder = Recorder()
    await sim.started(recorder)
    await sim.runner.cleanup()
    await wait(recorder.closed)
    assert recorder.errors == []  # 1001 going away is a normal closure


# HTTP control API.


async def test_http_fault_and_stats_api(start_sim: StartSim) -> None:
    sim = await start_sim()
    async with aiohttp.ClientSession(base_url=sim.base_url) as http:
        async with http.post("/_sim/faults", json={"kind": "bogus"}) as response:
            assert response.status == 400
        rules = [{"kind": "token_error", "status": 502}, {"kind": "stall", "times": -1}]
        async with http.post("/_sim/faults", json=rules) as response:
            assert response.status == 201
            assert [r["kind"] for r in (await response.json())["faults"]] == [
                "token_error",
                "stall",
            ]
        with pytest.raises(SessionTokenError) as caught:
            await sim.session(Recorder()).init()
        assert caught.value.http_status == 502
        async with http.get("/_sim/faults") as response:
            remaining = (await response.json())["faults"]
            assert remaining == [{"kind": "stall", "after_keyframes": 0, "times": -1}]
        async with http.delete("/_sim/faults") as response:
            assert response.status == 200
        assert sim.state.faults() == []
        async with http.get("/_sim/stats") as response:
            stats = await response.json()
    assert stats["faults_fired"] == 1 and stats["tokens_issued"] == 0
    assert set(stats) == {
        "tokens_issued", "sessions_opened", "sessions_open", "sessions_peak", "audio_bytes",
        "keyframes_sent", "messages_sent", "requests_ended", "interrupts", "faults_fired",
        "token_reuses",
    }  # fmt: skip
