"""The `relay` command as a user runs it: real subprocesses, real exit codes and messages."""

from __future__ import annotations

import os
import subprocess
import sys

from relay.dev.embedded import free_port
from relay.tokens import verify_token
from tests.conftest import TEST_SECRET


def relay(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items()
                if not k.startswith(("RELAY_", "SPATIUS_")) and k != "REDIS_URL"}
    full_env.update(env)
    return subprocess.run([sys.executable, "-m", "relay", *args], env=full_env,
                          capture_output=True, text=True, timeout=60)


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


def test_check_reports_redis_reachability(redis_url):
    assert relay("check", REDIS_URL=redis_url).returncode == 0
    dead = relay("check", REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    assert dead.returncode == 1 and "dependency_unreachable" in dead.stderr


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
    assert bad_number.returncode == 2 and "RELAY_STREAM_MAXLEN='lots' is not a valid int" in bad_number.stderr
