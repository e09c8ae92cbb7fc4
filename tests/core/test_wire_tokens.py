"""Pure logic: the wire format, tokens, settings and key names (no server needed)."""

from __future__ import annotations

import msgpack
import pytest

from relay import wire
from relay.errors import (
    ConfigError,
    InvalidConversationId,
    TokenError,
    TokenExpired,
    TokenMissing,
    TokenWrongConversation,
    WireError,
)
from relay.keys import Keys
from relay.settings import Settings
from relay.streams import StreamInfo, parse_id, valid_id
from relay.tokens import mint_token, verify_token

SECRET = "unit-secret-0123456789-0123456789"


def test_delivery_splice_equals_a_full_encode():
    stored = wire.frames("t-1", 4, b"\x08\x05envelope", last=True)
    spliced = wire.delivery("1700000000000-3", stored)
    expected = {"v": 1, "id": "1700000000000-3", **msgpack.unpackb(stored)}
    assert msgpack.unpackb(spliced) == expected
    message = wire.decode_server(spliced)
    assert (message.kind, message.id, message.turn) == ("frames", "1700000000000-3", "t-1")
    assert message.get("data") == b"\x08\x05envelope" and message.get("last") is True


def test_empty_frames_are_refused():
    with pytest.raises(WireError):
        wire.frames("t", 0, b"", last=False)


@pytest.mark.parametrize("data", [b"", b"\xc1", msgpack.packb([1]), msgpack.packb({1: 2}),
                                  msgpack.packb({"v": 2, "kind": "ping"}),
                                  msgpack.packb({"v": 1, "kind": "subscribe"})])
def test_bad_client_messages(data):
    with pytest.raises(WireError):
        wire.decode_client(data, max_bytes=4096)


def test_client_message_size_limit():
    with pytest.raises(WireError, match="exceeds"):
        wire.decode_client(wire.ping(1) + b"\x00" * 5000, max_bytes=4096)
    assert wire.decode_client(wire.ping(3), max_bytes=4096).kind == "ping"


def test_token_round_trip_and_failures():
    token = mint_token(SECRET, "c-1", ttl_s=60, now=1_000)
    assert verify_token(SECRET, token, "c-1", now=1_030).conversation_id == "c-1"
    with pytest.raises(TokenExpired):
        verify_token(SECRET, token, "c-1", now=1_000 + 60 + 31)
    with pytest.raises(TokenWrongConversation):
        verify_token(SECRET, token, "c-2", now=1_010)
    with pytest.raises(TokenMissing):
        verify_token(SECRET, "", "c-1")
    tampered = token[:-2] + ("AA" if not token.endswith("AA") else "BB")
    for bad in (tampered, "v2" + token[2:], "nonsense", token + ".x"):
        with pytest.raises(TokenError):
            verify_token(SECRET, bad, "c-1", now=1_010)
    with pytest.raises(TokenError):
        verify_token("another-secret-0123456-0123456789", token, "c-1", now=1_010)


def test_stream_ids():
    assert parse_id("12-3") < parse_id("12-10") < parse_id("13-0")
    assert valid_id("1700000000000-0") and not valid_id("abc") and not valid_id("1-2-3")


def test_resume_rule():
    info = StreamInfo(exists=True, last_id="100-5", first_id="50-0")
    assert info.can_resume_after("50-0") and info.can_resume_after("100-5")
    assert not info.can_resume_after("49-9")     # trimmed away
    assert not info.can_resume_after("100-6")    # beyond the stream: it was lost and recreated
    assert not StreamInfo(exists=False, last_id="0-0", first_id=None).can_resume_after("1-0")


def test_keys_share_a_slot_per_conversation():
    keys = Keys("p", buckets=16)
    tag = f"{{b{keys.bucket('c-1')}}}"
    tagged = {keys.stream("c-1"), keys.turn("c-1"), keys.conversation_lock("c-1"),
              keys.turn_input("c-1", "t-1"), keys.control_channel("c-1"),
              keys.live_channel("c-1")}
    assert all(key.startswith(f"p:{tag}:c-1:") for key in tagged)
    assert keys.bucket_tag_key(keys.bucket("c-1")).startswith(f"p:{tag}:")
    assert {keys.bucket(f"c-{n}") for n in range(200)} == set(range(16))
    with pytest.raises(InvalidConversationId):
        keys.stream("bad{id}")


def test_control_channel_round_trip():
    keys = Keys("p.x")
    channel = keys.control_channel("conv:7.a")
    assert keys.conversation_of_control(channel) == "conv:7.a"
    assert keys.conversation_of_control("p.x:{b3}:other:stream") is None
    assert keys.conversation_of_control("p.x:{b99}:conv-1:control") is None  # wrong bucket


def test_settings_from_env():
    settings = Settings.from_env({"REDIS_URL": "redis://x:1/0", "RELAY_PER_TURN_SESSIONS": "yes",
                                  "RELAY_FRAMES_TIMEOUT_S": "2.5"})
    assert settings.per_turn_sessions is True and settings.frames_timeout_s == 2.5
    assert "redis://x" not in repr(settings)  # may hold a password
    for env in ({"RELAY_SAMPLE_RATE": "11025"}, {"RELAY_STREAM_MAXLEN": "0"},
                {"RELAY_PER_TURN_SESSIONS": "maybe"}, {"RELAY_KEY_PREFIX": "a{b}"}):
        with pytest.raises(ConfigError):
            Settings.from_env(env)


async def test_lua_live_channel_of_stream_matches_keys(redis_client):
    from relay.keys import LIVE_CHANNEL_OF_STREAM

    keys = Keys("p.x:y", buckets=16)
    script = LIVE_CHANNEL_OF_STREAM + "return live_channel_of(KEYS[1])"
    for conv in ("c-1", "conv:7.a", "x" * 128):
        got = await redis_client.eval(script, 1, keys.stream(conv))
        assert got.decode() == keys.live_channel(conv)
