"""Every setting is checked against its documented range at start-up: a bad value stops the
process with exit 2 and ``configuration error: NAME=value: why`` (a JSON line from a role, a
sentence from a terminal command), never a traceback."""
from __future__ import annotations

import io
import math
import os
import re
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import fields
from pathlib import Path

import pytest

import relay.cli
from relay.errors import ConfigError
from relay.settings import SettingError, Settings, env_name, rule_of
from tests.conftest import TEST_SECRET
from tests.helpers.cli import error_of

ROOT = Path(__file__).resolve().parents[2]
FIELDS = list(fields(Settings))
NUMERIC = [f for f in FIELDS if str(f.type) in ("int", "float")]
FUZZ = ["-1", "0", "nan", "inf", "-inf", "ten", "1e999", "99999999999999999999"]


def test_every_setting_declares_its_range():
    for f in FIELDS:
        rule = rule_of(f.name)  # raises for a field declared without setting(...)
        assert rule.refuse(getattr(Settings(), f.name)) is None, f"{f.name}: default refused"


def test_every_setting_is_documented_with_its_range():
    """docs/operations.md shows each variable in a row whose `accepted` column is its rule."""
    rows = [line for line in (ROOT / "docs/operations.md").read_text().splitlines()
            if line.startswith("| `")]
    for f in FIELDS:
        name = env_name(f.name)
        row = next((r for r in rows if f"`{name}`" in r.split(" | ")[0]), None)
        assert row is not None, f"{name} is not in the settings tables of docs/operations.md"
        assert rule_of(f.name).doc in row.split(" | ")[2], f"{name}: range not documented"


def run_cli(monkeypatch, env: dict[str, str], *argv: str) -> tuple[int, str]:
    """``relay`` in this process with exactly these settings; returns (exit code, stderr)."""
    for name in list(os.environ):
        if name.startswith(("RELAY_", "SPATIUS_")) or name == "REDIS_URL":
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(relay.cli, "configure_logging", lambda **_: None)
    err = io.StringIO()
    with redirect_stderr(err), redirect_stdout(io.StringIO()), \
            pytest.raises(SystemExit) as exit_:
        relay.cli.main(list(argv))
    return int(exit_.value.code or 0), err.getvalue()


@pytest.mark.parametrize("field_name", [f.name for f in NUMERIC])
def test_fuzz_numeric_settings(monkeypatch, field_name):
    """-1, 0, nan, inf, text and huge numbers: refused by name with exit 2, or inside the range
    the docs show (and then the command runs), never anything else."""
    name, rule = env_name(field_name), rule_of(field_name)
    for raw in FUZZ:
        code, err = run_cli(monkeypatch, {name: raw, "RELAY_TOKEN_SECRET": TEST_SECRET},
                            "token", "conv-1")
        assert "Traceback" not in err
        value = _parsed(raw, str(next(f.type for f in NUMERIC if f.name == field_name)))
        if value is not None and rule.refuse(value) is None:
            assert code == 0, f"{name}={raw} is in range ({rule.doc}) but failed: {err}"
        else:
            assert code == 2, f"{name}={raw} was accepted ({rule.doc})"
            assert err.startswith(f"relay: configuration error: {name}={raw}: "), err


def _parsed(raw: str, kind: str) -> float | None:
    try:
        return int(raw) if kind == "int" else float(raw)
    except ValueError:
        return None


def test_nothing_non_finite_or_negative_passes():
    """The fuzz above relies on the rules; this pins the documented promise itself."""
    for f in NUMERIC:
        for value in (math.nan, math.inf, -1):
            assert rule_of(f.name).refuse(value), f"{f.name} accepts {value}"


@pytest.mark.parametrize(("env", "message"), [
    ({"RELAY_LOG_LEVEL": "loud"}, "RELAY_LOG_LEVEL=loud: must be one of debug, info"),
    ({"REDIS_URL": "http://localhost:6379"}, "REDIS_URL=http://localhost:6379: Redis URL must"),
    ({"REDIS_URL": "redis://user:hunter2@h:70000/0"}, "REDIS_URL=redis://user:***@h:70000/0: "),
    ({"RELAY_EDGE_PORT": "70000"}, "RELAY_EDGE_PORT=70000: must be 1 to 65535, or 0"),
    ({"RELAY_LOG_JSON": "maybe"}, "RELAY_LOG_JSON=maybe: must be true or false"),
    ({"RELAY_SAMPLE_RATE": "44000"}, "RELAY_SAMPLE_RATE=44000: must be one of 8000"),
    ({"RELAY_KEY_PREFIX": "a{b}"}, "RELAY_KEY_PREFIX=a{b}: must not contain braces"),
    ({"SPATIUS_CONSOLE_URL": "ftp://x"}, "SPATIUS_CONSOLE_URL=ftp://x: must be an http"),
    ({"RELAY_TOKEN_SECRET": "short-pw"}, "RELAY_TOKEN_SECRET=<hidden, 8 characters>: must be"),
])
def test_other_settings_are_refused_by_name(monkeypatch, env, message):
    code, err = run_cli(monkeypatch, env, "check")
    assert code == 2 and error_of(err).startswith(f"configuration error: {message}"), err
    assert "hunter2" not in err and "short-pw" not in err


def test_settings_built_in_code_are_checked_too():
    with pytest.raises(SettingError, match=r"^RELAY_HEARTBEAT_S=-5.0: must be > 0"):
        Settings(heartbeat_s=-5.0)
    with pytest.raises(ConfigError, match="RELAY_EDGE_PORT"):
        Settings().with_overrides(edge_port=65536)


@pytest.mark.parametrize(("role", "env"), [
    ("edge", {"RELAY_HEARTBEAT_S": "-5"}),
    ("edge", {"RELAY_DRAIN_TIMEOUT_S": "nan"}),
    ("producer", {"RELAY_CONVERSATION_LEASE_S": "0"}),
    ("producer", {"RELAY_SDK_LEASE_S": "-1"}),
    ("producer", {"RELAY_FRAMES_TIMEOUT_S": "-1"}),
    ("motion-sim", {"RELAY_SIM_PORT": "65536"}),
])
def test_roles_stop_at_start_up(redis_url, role, env):
    """The real processes, as an operator starts them, with values that used to crash or
    silently break delivery."""
    full = {"REDIS_URL": redis_url, "RELAY_TOKEN_SECRET": TEST_SECRET, "PATH": "/usr/bin:/bin",
            **env}
    result = subprocess.run([sys.executable, "-m", "relay", role], env=full,
                            capture_output=True, text=True, timeout=30)
    (name, raw), = env.items()
    assert result.returncode == 2, result.stderr
    # A role's stderr is JSON lines, its configuration errors too.
    assert re.match(rf"configuration error: {name}={re.escape(raw)}: \S",
                    error_of(result.stderr)), result.stderr
    assert "Traceback" not in result.stderr


def test_a_misspelt_variable_is_named_not_silently_ignored(monkeypatch):
    code, err = run_cli(monkeypatch, {"RELAY_HEARTBEAT": "5", "RELAY_TOKEN_SECRET": TEST_SECRET,
                                      "RELAY_WHATEVER_ELSE": "1"}, "token", "conv-1")
    assert code == 0
    assert ("relay: warning: RELAY_HEARTBEAT is not a setting (did you mean RELAY_HEARTBEAT_S?); "
            "it is ignored") in err
    assert "relay: warning: RELAY_WHATEVER_ELSE is not a setting; it is ignored" in err
    assert "RELAY_TOKEN_SECRET" not in err
