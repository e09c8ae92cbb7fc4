"""Running the `relay` command as a user would: a subprocess with a clean environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def relay(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items()
                if not k.startswith(("RELAY_", "SPATIUS_")) and k != "REDIS_URL"}
    full_env.update(env)
    return subprocess.run([sys.executable, "-m", "relay", *args], env=full_env,
                          capture_output=True, text=True, timeout=60)


def error_of(stderr: str) -> str:
    """The error a role reported: its stderr is JSON lines, every one of them (asserted here);
    the message of the last error line."""
    lines = [json.loads(line) for line in stderr.splitlines()]
    errors = [line["error"] for line in lines if line.get("level") in ("error", "critical")]
    assert errors, stderr
    return str(errors[-1])
