"""The client test vectors (relay/client/vectors/): checked in, reproducible, and passed by the
Python client's state machine (the web library runs the same files under node, see
tests/client/test_web_library.py)."""

from __future__ import annotations

import base64
import json
from collections import deque
from pathlib import Path
from typing import Any

import pytest

from relay import wire
from relay.client import AvatarKitAdapter, StreamPosition
from relay.dev import vectors

VECTOR_FILES = sorted(vectors.VECTORS_DIR.glob("*.json"))


def _b(value: dict[str, str]) -> bytes:
    return base64.b64decode(value["$bytes"])


class RecordingController:
    """Records SDK calls in the vectors' own notation; yieldAudioData returns what the step says."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.returns: deque[str | None] = deque()

    def yield_audio_data(self, audio: bytes, end: bool) -> str | None:
        returned = self.returns.popleft() if self.returns else None
        self.calls.append(vectors.audio_call(audio, end, returned))
        return returned

    def yield_frames_data(self, frames: list[bytes], conversation_id: str) -> None:
        self.calls.append(vectors.frames_call(frames, conversation_id))

    def interrupt(self) -> None:
        self.calls.append(dict(vectors.INTERRUPT_CALL))


def test_every_scenario_has_a_checked_in_file_equal_to_the_generator_output() -> None:
    rendered = vectors.render_all()
    assert sorted(rendered) == [p.name for p in VECTOR_FILES]
    stale = [name for name, text in rendered.items()
             if (vectors.VECTORS_DIR / name).read_text() != text]
    assert stale == [], "run: python -m relay.dev.vectors"


def test_vectors_cover_the_documented_situations() -> None:
    names = {p.stem for p in VECTOR_FILES}
    assert {"plain_turn", "mid_turn_join", "resume", "audio_only_from_start",
            "audio_only_mid_turn", "interrupt", "producer_failover", "recovered_false",
            "duplicates_after_reconnect_race"} <= names
    for path in VECTOR_FILES:
        steps = json.loads(path.read_text())["steps"]
        assert any(step.get("calls") for step in steps), path.name


@pytest.mark.parametrize("path", VECTOR_FILES, ids=lambda p: p.stem)
async def test_python_client_state_machine_passes_vector(path: Path) -> None:
    vector = json.loads(path.read_text())
    controller = RecordingController()
    position = StreamPosition(vector["initial_last_id"])
    adapter = AvatarKitAdapter(controller)
    for number, step in enumerate(vector["steps"]):
        if "reconnect" in step:
            assert position.last_id == step["reconnect"]["last_id"], f"step {number}"
            continue
        controller.returns.extend(c["returns"] for c in step["calls"]
                                  if c["method"] == "yieldAudioData")
        before = len(controller.calls)
        message = wire.decode_server(_b(step["receive"]))
        if position.accept(message):
            await adapter.handle(message)
        assert controller.calls[before:] == step["calls"], f"step {number}: {step.get('note')}"
    assert position.last_id == vector["final_last_id"]


async def test_the_harness_catches_a_client_that_compares_ids_as_strings() -> None:
    """The duplicates vector must fail a client that compares ids as text."""

    class TextPosition(StreamPosition):
        def accept(self, message: wire.Message) -> bool:
            if message.id is not None and self.last_id is not None and message.id <= self.last_id:
                return False
            if message.id is not None:
                self.last_id = message.id
            return True

    vector = json.loads((vectors.VECTORS_DIR / "duplicates_after_reconnect_race.json").read_text())
    controller, position = RecordingController(), TextPosition()
    adapter = AvatarKitAdapter(controller)
    expected: list[dict[str, Any]] = []
    for step in vector["steps"]:
        if "receive" not in step:
            continue
        expected += step["calls"]
        controller.returns.extend(c["returns"] for c in step["calls"]
                                  if c["method"] == "yieldAudioData")
        message = wire.decode_server(_b(step["receive"]))
        if position.accept(message):
            await adapter.handle(message)
    assert controller.calls != expected
