"""The client state machine of docs/protocol.md: which stream messages to drop, and which AvatarKit
SDK calls a correct client makes for the rest, one after another.

    position = StreamPosition(stored_last_id)
    adapter = AvatarKitAdapter(controller)
    for message in ...:
        if position.accept(message):
            await adapter.handle(message)

``controller`` is anything with the AvatarKit method names in Python spelling:
``yield_audio_data(audio, end) -> str | None``, ``yield_frames_data(frames, conversation_id)`` and
``interrupt()``; each may be a coroutine function. ``relay/client/vectors/`` holds the
language-neutral sequences this module (and the web library) is checked against.
"""

from __future__ import annotations

import inspect
from typing import Any, Protocol

from relay import wire
from relay.streams import parse_id


class AvatarController(Protocol):
    """The three AvatarKit controller calls Backend Mode needs (sync or async)."""

    def yield_audio_data(self, audio: bytes, end: bool) -> Any: ...

    def yield_frames_data(self, frames: list[bytes], conversation_id: str) -> Any: ...

    def interrupt(self) -> Any: ...


class StreamPosition:
    """The last stream id processed; drops any message at or below it (reconnect races)."""

    def __init__(self, last_id: str | None = None) -> None:
        self.last_id = last_id

    def accept(self, message: wire.Message) -> bool:
        """True if the message is to be processed; stream messages advance the position."""
        if message.id is None:
            return True
        # Ids compare as (ms, seq) integer pairs: "5-10" is after "5-9" although it sorts before.
        if self.last_id is not None and parse_id(message.id) <= parse_id(self.last_id):
            return False
        self.last_id = message.id
        return True


async def _settle(result: Any) -> Any:
    return await result if inspect.isawaitable(result) else result


class AvatarKitAdapter:
    """Turns accepted messages into SDK calls; call ``handle`` in message order, awaiting each."""

    def __init__(self, controller: AvatarController) -> None:
        self.controller = controller
        self.conversation_id: str | None = None

    async def handle(self, message: wire.Message) -> None:
        kind, controller = message.kind, self.controller
        if kind == wire.WELCOME:
            if message.get("recovered") is False:
                await self._interrupt()
        elif kind == wire.TURN_START:
            self.conversation_id = None
        elif kind == wire.AUDIO:
            returned = await _settle(controller.yield_audio_data(
                message.get("data", b""), bool(message.get("end"))))
            if returned is not None:
                # The SDK may mint a fresh id as a reply goes on; frames go to the latest one.
                self.conversation_id = str(returned)
        elif kind == wire.FRAMES:
            if self.conversation_id is not None:
                await _settle(controller.yield_frames_data([message.get("data")],
                                                           self.conversation_id))
        elif kind == wire.AUDIO_ONLY:
            if self.conversation_id is not None:
                await _settle(controller.yield_frames_data([], self.conversation_id))
        elif kind == wire.INTERRUPT:
            await self._interrupt()

    async def _interrupt(self) -> None:
        await _settle(self.controller.interrupt())
        self.conversation_id = None
