"""Fuzzing two edge processes while a sentinel client on each streams a conversation.

Forged, expired, future-dated, wrongly typed, re-encoded and algorithm-confused tokens; oversized
and malformed frames and requests; slow and silent handshakes; connection caps. Every attempt must
be refused exactly as docs/protocol.md says, each with exactly one structured log line; the
sentinels must get every message once; the edges' logs must hold no traceback, no plain-text
line and no token. Loopback only, a fixed number of attempts (seeded), about 15 seconds.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import random
import socket
import struct
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import aiohttp
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from relay import wire
from relay.client import RelayClient
from relay.dev.stack import LocalStack, child_env
from relay.streams import ConversationLog, read_after
from relay.tokens import mint_token, mint_v1_token
from tests.conftest import TEST_SECRET
from tests.helpers.edge import Listener
from tests.helpers.raw import client_frame, errors_and_close, raw_request, server_frames, upgrade

pytestmark = pytest.mark.slow

HANDSHAKE_S = 1.0
CAP = 3
ORIGIN = "https://app.example.com"
NONE_HEADER = base64.urlsafe_b64encode(b'{"alg":"none"}').rstrip(b"=").decode()
REFUSAL_EVENTS = {"client_refused", "client_message_refused", "http_request_refused",
                  "http_request_timeout"}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def signed(header: dict[str, Any], claims: dict[str, Any],
           secret: str | bytes = TEST_SECRET) -> str:
    key = secret.encode() if isinstance(secret, str) else secret
    signing = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    return f"{signing}.{b64(hmac.new(key, signing.encode(), hashlib.sha256).digest())}"


@dataclass
class Attempt:
    """One hostile (or, for ``header_wins``, merely odd) request and what the docs promise."""

    name: str
    request: bytes = b""
    expect_close: int | None = None  # WebSocket close code
    expect_reason: str = ""
    expect_errors: list[str] = field(default_factory=list)  # error.code values before the close
    expect_status: int | None = None  # plain HTTP answer instead of an upgrade
    expect_silent_close: bool = False  # closed without an answer (handshake timeout)
    refusals: int = 1  # log lines it must cause
    reset: bool = False  # abort the connection (TCP RST) right after sending: 0 or 1 line
    after_upgrade: bytes = b""  # frames sent once the WebSocket is open
    trickle: bool = False
    tokens: list[str] = field(default_factory=list)


class Keys:
    def __init__(self, tmp: Path) -> None:
        self.rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.es = ec.generate_private_key(ec.SECP256R1())
        self.rsa_pem = self.rsa.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
        es_pem = self.es.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
        self.path = tmp / "keys.json"
        self.path.write_text(json.dumps({"keys": [
            {"kid": "rsa-1", "alg": "RS256", "pem": self.rsa_pem},
            {"kid": "es-1", "alg": "ES256", "pem": es_pem}]}))


def token_attempts(conv: str, keys: Keys, rng: random.Random) -> list[tuple[str, str | None,
                                                                           int, str]]:
    """(name, token, close code, reason) for every token an attacker might try."""
    now = int(time.time())
    good = mint_token(TEST_SECRET, conv, ttl_s=300)
    es_good = mint_token(keys.es, conv, algorithm="ES256", kid="es-1", ttl_s=300)
    head, body, sig = good.split(".")
    raw_sig = base64.urlsafe_b64decode(sig + "=")
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    spare = alphabet[alphabet.index(sig[-1]) ^ 1]
    claims = {"conv": conv, "iat": now, "exp": now + 300}
    invalid = wire.CloseCode.TOKEN_INVALID
    cases: list[tuple[str, str | None, int, str]] = [
        ("missing", None, invalid, "token_missing"),
        ("forged_secret", mint_token("x" * 40, conv), invalid, "invalid_token"),
        ("forged_es256", mint_token(ec.generate_private_key(ec.SECP256R1()), conv,
                                    algorithm="ES256", kid="es-1"), invalid, "invalid_token"),
        ("expired", mint_token(TEST_SECRET, conv, ttl_s=60, now=now - 3600),
         wire.CloseCode.TOKEN_EXPIRED, "token_expired"),
        ("iat_future", signed({"alg": "HS256"}, {**claims, "iat": now + 3600, "exp": now + 7200}),
         invalid, "token_not_yet_valid"),
        ("nbf_future", signed({"alg": "HS256"}, {**claims, "nbf": now + 3600}), invalid,
         "token_not_yet_valid"),
        ("exp_string", signed({"alg": "HS256"}, {**claims, "exp": str(now + 300)}), invalid,
         "invalid_token"),
        ("exp_float", signed({"alg": "HS256"}, {**claims, "exp": now + 300.5}), invalid,
         "invalid_token"),
        ("conv_number", signed({"alg": "HS256"}, {**claims, "conv": 5}), invalid,
         "invalid_token"),
        ("no_exp", signed({"alg": "HS256"}, {"conv": conv, "iat": now}), invalid,
         "invalid_token"),
        ("too_long_lived", signed({"alg": "HS256"}, {**claims, "exp": now + 30 * 86400}),
         invalid, "invalid_token"),
        ("alg_none", f"{NONE_HEADER}.{body}.", invalid, "invalid_token"),
        ("alg_confusion", signed({"alg": "HS256", "kid": "rsa-1"}, claims,
                                 secret=keys.rsa_pem), invalid, "invalid_token"),
        ("kid_swap", es_good.replace(es_good.split(".")[0], b64(json.dumps(
            {"alg": "ES256", "kid": "rsa-1"}).encode())), invalid, "invalid_token"),
        ("unknown_kid", mint_token(TEST_SECRET, conv, kid="nope"), invalid, "invalid_token"),
        ("padded", f"{good}=", invalid, "invalid_token"),
        ("padded_header", f"{head}=.{body}.{sig}", invalid, "invalid_token"),
        ("spare_bits", f"{head}.{body}.{sig[:-1]}{spare}", invalid, "invalid_token"),
        ("crit_header", signed({"alg": "HS256", "crit": ["exp"]}, claims), invalid,
         "invalid_token"),
        ("dup_member", _dup_member(conv, now), invalid, "invalid_token"),
        ("other_conversation", mint_token(TEST_SECRET, "someone-else"),
         wire.CloseCode.TOKEN_WRONG_CONVERSATION, "token_wrong_conversation"),
        ("v1_exp_string", _v1({"c": conv, "iat": now, "exp": str(now + 60)}), invalid,
         "invalid_token"),
        ("v1_future", _v1({"c": conv, "iat": now + 3600, "exp": now + 7200}), invalid,
         "token_not_yet_valid"),
        ("v1_padded", mint_v1_token(TEST_SECRET, conv) + "=", invalid, "invalid_token"),
        ("huge", "a" * 5000, invalid, "invalid_token"),
    ]
    standard = base64.b64encode(raw_sig).decode().rstrip("=")
    if standard != sig:  # the same signature bytes in the +/ alphabet
        cases.append(("std_alphabet", f"{head}.{body}.{standard}", invalid, "invalid_token"))
    for i in range(12):  # one changed character anywhere: never accepted
        pos = rng.randrange(len(good))
        if good[pos] == ".":
            continue
        choices = alphabet.replace(good[pos], "")
        cases.append((f"mutated_{i}", good[:pos] + rng.choice(choices) + good[pos + 1:],
                      invalid, "invalid_token"))
    for i in range(4):
        junk = "".join(rng.choice(alphabet + ".") for _ in range(rng.randrange(1, 300)))
        cases.append((f"junk_{i}", junk, invalid, "invalid_token"))
    return cases


def _dup_member(conv: str, now: int) -> str:
    signing = (b64(b'{"alg":"HS256"}') + "."
               + b64(f'{{"conv":"x","exp":{now + 300},"conv":"{conv}"}}'.encode()))
    mac = hmac.new(TEST_SECRET.encode(), signing.encode(), hashlib.sha256).digest()
    return f"{signing}.{b64(mac)}"


def _v1(payload: dict[str, Any]) -> str:
    part = "v1." + b64(json.dumps(payload).encode())
    mac = hmac.new(TEST_SECRET.encode(), part.encode(), hashlib.sha256).digest()
    return f"{part}.{b64(mac)}"


def attempts_for(host: str, keys: Keys, rng: random.Random, index: int) -> list[Attempt]:
    out: list[Attempt] = []
    for name, tok, code, reason in token_attempts(f"fz-tok-{index}", keys, rng):
        path = f"/v1/conversations/fz-tok-{index}/ws"
        via_header = name.startswith("mutated") and int(name.rsplit("_", 1)[1]) % 2 == 0
        extra = [f"Authorization: Bearer {tok}"] if via_header and tok else []
        query = f"?token={quote(tok, safe='')}" if tok and not via_header else ""
        out.append(Attempt(name, upgrade(path + query, host, *extra), expect_close=code,
                           expect_reason=reason, tokens=[tok] if tok else []))
    good = mint_token(TEST_SECRET, "fz-ok")
    out.append(Attempt("two_token_params", upgrade(
        f"/v1/conversations/fz-ok/ws?token={good}&token={good}", host),
        expect_close=wire.CloseCode.TOKEN_INVALID, expect_reason="invalid_token", tokens=[good]))
    frames = {
        "too_big_70k": (client_frame(b"\x00" * 70_000), 1009, "message_too_big"),
        "too_big_5k": (client_frame(b"\x00" * 5000), 1009, "message_too_big"),
        "rsv1": (client_frame(wire.ping(1), rsv1=True), 1002, "bad_frame"),
        "opcode_3": (client_frame(b"x", opcode=3), 1002, "bad_frame"),
        "orphan_continuation": (client_frame(b"x", opcode=0), 1002, "bad_frame"),
        "text": (client_frame(b"hello", opcode=1), 4400, "bad_message"),
        "not_msgpack": (client_frame(b"\xc1\xff"), 4400, "bad_message"),
        "unknown_kind": (client_frame(wire.ping(1).replace(b"ping", b"pong")), 4400,
                         "bad_message"),
    }
    for i, (name, (frame, code, reason)) in enumerate(frames.items()):
        conv = f"fz-frame-{index}-{i}"
        tok = mint_token(TEST_SECRET, conv)
        out.append(Attempt(name, upgrade(f"/v1/conversations/{conv}/ws?token={tok}", host),
                           after_upgrade=frame, expect_close=code, expect_reason=reason,
                           expect_errors=[reason], tokens=[tok]))
    tok = mint_token(TEST_SECRET, "fz-ids")
    for name, conv in (("braces", "%7Bfz%7D"), ("raw_braces", "{fz}"), ("dot", "%2E"),
                       ("dotdot", "%2E%2E"), ("slash", "a%2Fb"), ("empty", ""),
                       ("long_id", "x" * 200)):
        out.append(Attempt(name, upgrade(f"/v1/conversations/{conv}/ws?token={tok}", host),
                           expect_close=4400, expect_reason="bad_conversation_id",
                           expect_errors=["bad_conversation_id"], tokens=[tok]))
    tok = mint_token(TEST_SECRET, "fz-last")
    out.append(Attempt("bad_last_id", upgrade(
        f"/v1/conversations/fz-last/ws?token={tok}&last_id=zz", host), expect_close=4400,
        expect_reason="bad_last_id", expect_errors=["bad_last_id"], tokens=[tok]))
    tok = mint_token(TEST_SECRET, "fz-origin")
    out.append(Attempt("foreign_origin", upgrade(
        f"/v1/conversations/fz-origin/ws?token={tok}", host, "Origin: https://evil.example"),
        expect_status=403, tokens=[tok]))
    secret_line = "S" * 40 + mint_token(TEST_SECRET, "fz-long")
    out += [
        Attempt("long_request_line", upgrade(f"/v1/conversations/c/ws?token={secret_line}"
                                             + "x" * 9000, host), expect_status=400,
                tokens=[secret_line]),
        Attempt("long_header", upgrade("/v1/conversations/c/ws", host,
                                       f"Authorization: Bearer {secret_line}{'y' * 9000}"),
                expect_status=400, tokens=[secret_line]),
        Attempt("not_http", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(64),
                expect_status=400),
        Attempt("not_an_upgrade", b"GET /v1/conversations/fz/ws?token=" + good.encode()
                + f" HTTP/1.1\r\nHost: {host}\r\n\r\n".encode(), expect_status=400,
                tokens=[good]),
        Attempt("bad_header_line", b"GET /healthz HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n",
                expect_status=400),
        Attempt("silent", b"", expect_silent_close=True),
        Attempt("trickle", b"GET /v1/conversations/fz/ws?tok", expect_silent_close=True,
                trickle=True),
        Attempt("half_head", upgrade("/v1/conversations/fz/ws", host)[:-2],
                expect_silent_close=True),
    ]
    # Clients that vanish mid-conversation: the edge answers into a reset connection.
    for i, name in enumerate(("reset_after_ping", "reset_after_bad_frame", "reset_mid_upgrade")):
        conv = f"fz-reset-{index}-{i}"
        tok = mint_token(TEST_SECRET, conv)
        request = upgrade(f"/v1/conversations/{conv}/ws?token={tok}", host)
        frames = {"reset_after_ping": client_frame(wire.ping(7)) * 20,
                  "reset_after_bad_frame": client_frame(b"\x00" * 70_000),
                  "reset_mid_upgrade": b""}[name]
        out.append(Attempt(name, request[:-10] if name == "reset_mid_upgrade" else request,
                           after_upgrade=frames, reset=True, refusals=0, tokens=[tok]))
    # Header and query both: the header wins, so a junk query token does not matter.
    tok = mint_token(TEST_SECRET, "fz-both")
    out.append(Attempt("header_wins", upgrade("/v1/conversations/fz-both/ws?token=junk", host,
                                              f"Authorization: Bearer {tok}"),
                       after_upgrade=client_frame(b"", opcode=8), refusals=0, tokens=[tok]))
    return out


async def reset_attempt(url: str, attempt: Attempt) -> None:
    parts = urlsplit(url)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (parts.hostname, parts.port))
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(attempt.request)
    if attempt.after_upgrade:
        await reader.readuntil(b"\r\n\r\n")  # the 101
        writer.write(attempt.after_upgrade)
    await writer.drain()
    await asyncio.sleep(0.05)
    writer.transport.abort()  # SO_LINGER 0: the kernel sends RST


async def run_attempt(url: str, attempt: Attempt) -> None:
    parts = urlsplit(url)
    if attempt.reset:
        await reset_attempt(url, attempt)
        return
    if attempt.expect_silent_close:
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        started = time.monotonic()
        writer.write(attempt.request)
        if attempt.trickle:
            async def trickle() -> None:
                while not writer.is_closing():
                    writer.write(b"e")
                    await asyncio.sleep(0.2)
            task = asyncio.create_task(trickle())
        try:
            answer = await asyncio.wait_for(reader.read(), HANDSHAKE_S + 3)
        except ConnectionResetError:  # closed with our trickled bytes unread: RST, as good
            answer = b""
        if attempt.trickle:
            task.cancel()
        writer.close()
        assert answer == b"", attempt.name
        assert time.monotonic() - started < HANDSHAKE_S + 1.5, attempt.name
        return
    data = await raw_request(url, attempt.request + attempt.after_upgrade, read_timeout=5)
    status_line = data.split(b"\r\n", 1)[0]
    if attempt.expect_status is not None:
        assert status_line.split(b" ")[1] == str(attempt.expect_status).encode(), (
            attempt.name, status_line)
        return
    assert b" 101 " in status_line, (attempt.name, status_line)
    frames = server_frames(data)
    if attempt.name == "header_wins":
        assert wire.decode_server(frames[0][1]).kind == "welcome"
        return
    codes, close, reason = errors_and_close(frames)
    assert (close, reason.decode(), codes) == (
        attempt.expect_close, attempt.expect_reason, attempt.expect_errors), attempt.name
    kinds = [wire.decode_server(p).kind for op, p in frames if op == 2]
    if attempt.after_upgrade:
        assert kinds[0] == "welcome", attempt.name
    else:
        assert "welcome" not in kinds, attempt.name  # refused before any delivery


async def cap_attempt(url: str) -> list[str]:
    """CAP clients on one conversation, then one more: too_many_connections, 4430."""
    conv = "fz-cap"
    tok = mint_token(TEST_SECRET, conv)
    async with aiohttp.ClientSession() as http:
        held = [await http.ws_connect(f"{url}/v1/conversations/{conv}/ws",
                                      headers={"Authorization": f"Bearer {tok}"})
                for _ in range(CAP)]
        for ws in held:
            assert wire.decode_server((await ws.receive(timeout=5)).data).kind == "welcome"
        async with http.ws_connect(f"{url}/v1/conversations/{conv}/ws",
                                   headers={"Authorization": f"Bearer {tok}"}) as ws:
            error = wire.decode_server((await ws.receive(timeout=5)).data)
            assert error.get("code") == "too_many_connections"
            assert (await ws.receive(timeout=5)).data == wire.CloseCode.TOO_MANY_CONNECTIONS
        for ws in held:
            await ws.close()
    return [tok]


@pytest.fixture
async def stack(settings, tmp_path):
    keys = Keys(tmp_path)
    local = LocalStack(child_env(settings, settings.redis_url, TEST_SECRET), tmp_path / "logs")
    extra = {"RELAY_TOKEN_KEYS_FILE": str(keys.path),
             "RELAY_EDGE_HANDSHAKE_TIMEOUT_S": str(HANDSHAKE_S),
             "RELAY_EDGE_MAX_PER_CONVERSATION": str(CAP), "RELAY_EDGE_ALLOWED_ORIGINS": ORIGIN}
    try:
        started = await asyncio.gather(local.start_edge("edge-fz1", **extra),
                                       local.start_edge("edge-fz2", **extra))
        yield local, keys, [url for _, url in started], [child for child, _ in started]
    finally:
        await local.stop()


async def test_hostile_clients_at_two_edges_leave_the_sentinels_untouched(
        stack, redis_client, keys):
    local, token_keys, urls, children = stack
    log = ConversationLog(redis_client, keys, maxlen=10_000, ttl_s=300)
    conv = "fz-sentinel"
    sentinels = [Listener(RelayClient(url, conv, mint_token(TEST_SECRET, conv))) for url in urls]
    for sentinel in sentinels:
        await sentinel.joined()
    stop = asyncio.Event()

    async def stream() -> None:
        await log.open_turn(conv, "t1", sample_rate=16000, owner="fuzz")
        seq = 0
        while not stop.is_set():
            await log.append(conv, "t1", wire.audio("t1", seq, bytes([seq % 256]) * 640,
                                                     end=False))
            seq += 1
            await asyncio.sleep(0.005)
        await log.end_turn(conv, "t1", status=wire.STATUS_COMPLETE)

    writer = asyncio.create_task(stream())
    rng = random.Random(1313)
    per_edge = [attempts_for(urlsplit(url).netloc, token_keys, rng, i)
                for i, url in enumerate(urls)]
    limit = asyncio.Semaphore(24)

    async def bounded(url: str, attempt: Attempt) -> None:
        async with limit:
            try:
                await run_attempt(url, attempt)
            except (TimeoutError, OSError) as exc:
                raise AssertionError(f"{attempt.name}: {exc!r}") from exc

    started = time.monotonic()
    await asyncio.gather(*(bounded(url, a) for url, batch in zip(urls, per_edge, strict=True)
                           for a in batch))
    cap_tokens = await asyncio.gather(*(cap_attempt(url) for url in urls))
    attack_s = time.monotonic() - started
    stop.set()
    await writer

    truth = [i for i, _ in await read_after(redis_client, keys, conv, "0-0", count=100_000)]
    for sentinel in sentinels:
        received = await sentinel.wait_for(lambda ms: ms and ms[-1].kind == "turn_end")
        assert [m.id for m in received] == truth  # every message, once, in order
        assert sentinel.client.connections == 1
        await sentinel.close()
    await local.stop()

    attempts = sum(len(batch) for batch in per_edge)
    secrets = {t for batch in per_edge for a in batch for t in a.tokens}
    secrets |= {t for toks in cap_tokens for t in toks} | {TEST_SECRET}
    secrets |= {s.split(".")[2] for s in secrets if s.count(".") == 2 and len(s.split(".")[2]) > 16}
    for child, batch in zip(children, per_edge, strict=True):
        lines = child.log_path.read_text().splitlines()
        events = []
        for line in lines:
            assert "Traceback" not in line, line
            record = json.loads(line)  # every line is one JSON object, nothing plain-text
            assert isinstance(record, dict)
            leaked = [s for s in secrets if s and s in line]
            assert not leaked, (record.get("event"), line[:200])
            assert "token=" not in line and "x" * 64 not in line
            events.append(record)
        refusals = Counter(r["event"] for r in events if r["event"] in REFUSAL_EVENTS)
        expected = sum(a.refusals for a in batch) + 1  # + the one cap refusal
        resets = sum(a.reset for a in batch)  # a reset may or may not beat the refusal
        assert expected <= sum(refusals.values()) <= expected + resets, refusals
        timeouts = [r for r in events if r["event"] == "http_request_timeout"]
        assert len(timeouts) == sum(a.expect_silent_close for a in batch)
        assert {r["remote"] for r in timeouts} == {"127.0.0.1"}
    print(f"{attempts} hostile attempts + {2 * (CAP + 1)} cap connections at 2 edges in "
          f"{attack_s:.1f} s; sentinels got {len(truth)} messages each, exactly once")
