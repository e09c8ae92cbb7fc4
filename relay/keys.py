"""The only module that names Redis keys.

Every per-conversation key carries the conversation id inside a hash tag (``{...}``) so that a
conversation's stream, turn record and locks live in one Redis Cluster slot and can be touched
by one script or transaction. Keys shared by the whole deployment (the job queue, the SDK session
leases) have no tag and live wherever the cluster puts them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from relay.errors import InvalidConversationId

# Braces are excluded because they would break the hash tag; the rest keeps ids safe in URLs,
# logs and key names alike.
_CONVERSATION_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_TURN_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


def _glob_escape(text: str) -> str:
    """Escape the characters Redis glob patterns treat specially (braces are literal there)."""
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


def validate_conversation_id(conversation_id: str) -> str:
    if not isinstance(conversation_id, str) or not _CONVERSATION_ID.match(conversation_id):
        raise InvalidConversationId(
            "conversation id must be 1-128 characters of A-Z a-z 0-9 . _ : -"
        )
    return conversation_id


def validate_turn_id(turn_id: str) -> str:
    if not isinstance(turn_id, str) or not _TURN_ID.match(turn_id):
        raise ValueError("turn id must be 1-64 characters of A-Z a-z 0-9 . _ : -")
    return turn_id


@dataclass(frozen=True)
class Keys:
    """Key names under one prefix, so several deployments (or test runs) can share a server."""

    prefix: str = "relay"

    def _conv(self, conversation_id: str, suffix: str) -> str:
        validate_conversation_id(conversation_id)
        return f"{self.prefix}:{{{conversation_id}}}:{suffix}"

    def stream(self, conversation_id: str) -> str:
        """The conversation's delivery stream: every message clients receive, in order."""
        return self._conv(conversation_id, "stream")

    def turn(self, conversation_id: str) -> str:
        """Hash describing the current turn: id, start entry, status, owner."""
        return self._conv(conversation_id, "turn")

    def conversation_lock(self, conversation_id: str) -> str:
        """Lease held by the producer that runs this conversation's turns, so turns never interleave."""
        return self._conv(conversation_id, "lock")

    def turn_input(self, conversation_id: str, turn_id: str) -> str:
        """Stream of audio chunks a caller feeds into a streamed turn while TTS is still generating."""
        validate_turn_id(turn_id)
        return self._conv(conversation_id, f"input:{turn_id}")

    def control_channel(self, conversation_id: str) -> str:
        """Pub/sub channel that tells the producer running a turn to stop it at once."""
        return self._conv(conversation_id, "control")

    def control_pattern(self) -> str:
        """PSUBSCRIBE pattern matching every conversation's control channel under this prefix."""
        return f"{_glob_escape(self.prefix)}:{{*}}:control"

    def conversation_of_control(self, channel: str) -> str | None:
        """The conversation id inside a control channel name, or None for any other name."""
        head, tail = f"{self.prefix}:{{", "}:control"
        if not (channel.startswith(head) and channel.endswith(tail)):
            return None
        conversation_id = channel[len(head) : -len(tail)]
        return conversation_id if _CONVERSATION_ID.match(conversation_id) else None

    def edge_wake(self, node_id: str, tag: str = "") -> str:
        """Tiny stream an edge includes in its blocking read so a new subscription can wake it.

        On a cluster the edge needs one per node; ``tag`` becomes a hash tag chosen to land on it.
        """
        suffix = f":{{w{tag}}}" if tag else ""
        return f"{self.prefix}:edge:{node_id}:wake{suffix}"

    def jobs(self) -> str:
        """Stream of turn jobs consumed by producer workers through a consumer group."""
        return f"{self.prefix}:jobs"

    def jobs_group(self) -> str:
        return "producers"

    # The two session-cap keys share the ``{sdk}`` hash tag: one script updates both.

    def sdk_sessions(self) -> str:
        """Sorted set of live Motion Server session leases (member -> expiry in ms) across producers."""
        return f"{self.prefix}:{{sdk}}:sessions"

    def sdk_waiters(self) -> str:
        """Sorted set of turns waiting for a session slot (member -> expiry in ms): the demand
        that makes producers close their idle sessions early."""
        return f"{self.prefix}:{{sdk}}:waiters"
