"""The web library's own tests (the client test vectors and its connection logic) under node's
test runner; the same library runs in headless Chromium in tests/browser/."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

WEB = Path(__file__).resolve().parents[2] / "relay" / "client" / "web"
NODE = shutil.which("node")

pytestmark = [
    pytest.mark.skipif(NODE is None, reason="[web] no node on PATH"),
    pytest.mark.skipif(not (WEB / "node_modules" / "@msgpack" / "msgpack").is_dir(),
                       reason="[web] the web client's node modules are missing"),
]


def test_web_library_passes_the_vectors_and_its_unit_tests() -> None:
    assert NODE is not None
    result = subprocess.run([NODE, "--test", "--test-timeout=20000", "test/"], cwd=WEB,
                            capture_output=True, text=True, timeout=120)
    summary = [line for line in result.stdout.splitlines() if line.startswith(("# pass", "# fail"))]
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert summary[0].split()[-1] != "0" and summary[1] == "# fail 0", summary
