"""Running the `relay` command as a user would: a subprocess with a clean environment."""

from __future__ import annotations

import os
import subprocess
import sys


def relay(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items()
                if not k.startswith(("RELAY_", "SPATIUS_")) and k != "REDIS_URL"}
    full_env.update(env)
    return subprocess.run([sys.executable, "-m", "relay", *args], env=full_env,
                          capture_output=True, text=True, timeout=60)
