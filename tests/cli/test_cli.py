"""The `relay` command as a user runs it: real subprocesses, real exit codes and messages."""

from __future__ import annotations

import json

from relay.dev.embedded import free_port
from relay.tokens import verify_token
from tests.conftest import TEST_SECRET
from tests.helpers.cli import relay


def test_token_mints_a_verifiable_token():
    result = relay("token", "conv-7", "--ttl", "120", RELAY_TOKEN_SECRET=TEST_SECRET)
    assert result.returncode == 0, result.stderr
    claims = verify_token(TEST_SECRET, result.stdout.strip(), "conv-7")
    assert claims.expires_at - claims.issued_at == 120


def test_token_errors_are_clear():
    missing = relay("token", "conv-7")
    assert missing.returncode == 2 and "RELAY_TOKEN_SECRET is not set" in missing.stderr
    bad_id = relay("token", "conv{7}", RELAY_TOKEN_SECRET=TEST_SECRET)
    assert bad_id.returncode == 2 and "conversation id" in bad_id.stderr
    short = relay("token", "conv-7", RELAY_TOKEN_SECRET="short")
    assert short.returncode == 2 and "at least 32" in short.stderr


def test_token_refuses_a_bad_ttl_without_a_traceback():
    for ttl in ("-5", "0", "soon"):
        result = relay("token", "conv-7", "--ttl", ttl, RELAY_TOKEN_SECRET=TEST_SECRET)
        assert result.returncode == 2 and "argument --ttl" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr


def test_version():
    from importlib.metadata import version

    result = relay("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"relay {version('avatar-relay')}"


def test_check_reports_redis_reachability(redis_url):
    assert relay("check", REDIS_URL=redis_url).returncode == 0
    # No REDIS_URL is an unreachable dependency (exit 1, as documented), not a usage error.
    unset = relay("check")
    assert unset.returncode == 1 and "REDIS_URL is not set" in unset.stderr
    dead = relay("check", REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    assert dead.returncode == 1 and "dependency_unreachable" in dead.stderr


def test_edge_on_a_taken_port_says_so_by_name(redis_url):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = relay("edge", "--port", str(port), REDIS_URL=redis_url,
                       RELAY_TOKEN_SECRET=TEST_SECRET)
    assert result.returncode == 2, result.stderr
    # A role logs JSON lines, its startup error too.
    errors = [json.loads(line) for line in result.stderr.splitlines()
              if json.loads(line)["level"] == "error"]
    assert [e["error"] for e in errors] == [
        f"edge cannot listen on 127.0.0.1:{port}: Address already in use "
        "(change RELAY_EDGE_PORT or --port)"]


def test_check_producer_probes_motion_server(redis_url):
    result = relay("check", "--role", "producer", REDIS_URL=redis_url,
                   SPATIUS_CONSOLE_URL=f"http://127.0.0.1:{free_port()}/v1/console")
    assert result.returncode == 1 and "motion server console" in result.stderr


def test_roles_refuse_to_start_without_their_settings(redis_url):
    edge = relay("edge", "--port", str(free_port()), REDIS_URL=redis_url)
    assert edge.returncode == 2 and "RELAY_TOKEN_SECRET" in edge.stderr
    producer = relay("producer", REDIS_URL=redis_url)
    assert producer.returncode == 2 and "SPATIUS_API_KEY" in producer.stderr
    bad_number = relay("edge", RELAY_STREAM_MAXLEN="lots", REDIS_URL=redis_url)
    assert bad_number.returncode == 2
    assert "configuration error: RELAY_STREAM_MAXLEN=lots: not an integer" in bad_number.stderr


def test_token_takes_a_key_id_and_a_private_key(tmp_path):
    import jwt
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    with_kid = relay("token", "conv-7", "--kid", "k2", RELAY_TOKEN_SECRET=TEST_SECRET,
                     RELAY_TOKEN_KID="k2")
    assert with_kid.returncode == 0, with_kid.stderr
    assert jwt.get_unverified_header(with_kid.stdout.strip())["kid"] == "k2"
    unknown = relay("token", "conv-7", "--kid", "k9", RELAY_TOKEN_SECRET=TEST_SECRET)
    assert unknown.returncode == 2 and "no secret for kid 'k9'" in unknown.stderr
    private = ed25519.Ed25519PrivateKey.generate()
    pem = tmp_path / "signing.pem"
    pem.write_bytes(private.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    signed = relay("token", "conv-7", "--kid", "ed-1", "--key-file", str(pem))
    assert signed.returncode == 0, signed.stderr
    claims = jwt.decode(signed.stdout.strip(), private.public_key(), algorithms=["EdDSA"])
    assert claims["conv"] == "conv-7"
    too_long = relay("token", "conv-7", "--ttl", "9999999", RELAY_TOKEN_SECRET=TEST_SECRET)
    assert too_long.returncode == 2 and "Traceback" not in too_long.stderr
