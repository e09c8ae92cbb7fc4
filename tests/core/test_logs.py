"""Every stderr line is one JSON object, whoever wrote it, and URL passwords never appear.

Run in a fresh interpreter: logging configuration is process-wide."""

from __future__ import annotations

import json
import subprocess
import sys

from relay.logs import redact

_SCRIPT = r"""
import logging, warnings, structlog
from relay.logs import configure_logging
configure_logging(json=True, level="info")
structlog.get_logger("relay.test").info("connecting", url="redis://:hunter2@db:6379/0",
                                        conversation_id="c1")
logging.getLogger("aiohttp.server").error("Error handling request from %s", "10.0.0.1")
logging.getLogger("opentelemetry.exporter").warning("export failed to https://u:hunter2@t/x")
logging.getLogger("aiohttp.access").info("below warning: dropped")
warnings.warn("old API", DeprecationWarning, stacklevel=1)
try:
    raise ValueError("redis://admin:hunter2@h:1 refused")
except ValueError:
    logging.getLogger("asyncio").exception("Task exception was never retrieved")
raise RuntimeError("escaped from rediss://x:hunter2@y")
"""


def test_every_line_is_json_whoever_logs_it() -> None:
    result = subprocess.run([sys.executable, "-W", "always", "-c", _SCRIPT],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    lines = [json.loads(line) for line in result.stderr.splitlines()]
    events = [line["event"] for line in lines]
    assert events[0] == "connecting" and lines[0]["conversation_id"] == "c1"
    assert "Error handling request from 10.0.0.1" in events
    assert any(line.get("logger") == "py.warnings" and "old API" in line["event"]
               for line in lines)
    assert not any("below warning" in event for event in events)
    traced = next(line for line in lines if line.get("logger") == "asyncio")
    assert "ValueError" in traced["exception"]
    assert lines[-1]["event"] == "uncaught_exception" and "RuntimeError" in lines[-1]["exception"]
    assert "hunter2" not in result.stderr
    assert "redis://:***@db:6379/0" in result.stderr


def test_redact_masks_only_passwords() -> None:
    assert redact("redis://user:pw@host:1/0") == "redis://user:***@host:1/0"
    assert redact("rediss://:pw@host") == "rediss://:***@host"
    assert (redact("redis://host:6379/0 and http://a:b@c/d")
            == "redis://host:6379/0 and http://a:***@c/d")
    assert redact("no url here: just:text@thing") == "no url here: just:text@thing"
