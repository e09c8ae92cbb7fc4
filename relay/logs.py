"""Logging set-up, called once by the CLI: JSON lines in production, readable on a terminal.

Everything that reaches stderr goes through structlog's renderer: the relay's own structlog calls,
the standard library's ``logging`` (aiohttp, asyncio, redis, the Spatius SDK, OpenTelemetry),
``warnings``, and uncaught exceptions. With ``json`` every line is one JSON object. Passwords in
URLs are masked in every field of every line, whoever logged it.
"""

from __future__ import annotations

import logging
import re
import sys
from types import TracebackType
from typing import Any

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

# scheme://user:password@host -> scheme://user:***@host (also scheme://:password@host).
_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:/@\s]*:)[^@/\s]+@")


def redact(text: str) -> str:
    """``text`` with the password of every URL in it masked."""
    return _URL_PASSWORD.sub(r"\g<head>***@", text) if "://" in text else text


def _redact_values(_: WrappedLogger, __: str, event: EventDict) -> EventDict:
    for key, value in event.items():
        if isinstance(value, str):
            event[key] = redact(value)
    return event


def configure_logging(*, json: bool, level: str = "info") -> None:
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        numeric = logging.INFO
    renderer: Processor
    if json:
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    tail: list[Processor] = [structlog.processors.format_exc_info, _redact_values, renderer]
    structlog.configure(
        processors=[*shared, *tail],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    _route_stdlib(shared, tail, max(numeric, logging.WARNING))
    if json:
        sys.excepthook = _log_uncaught


def _route_stdlib(shared: list[Processor], tail: list[Processor], level: int) -> None:
    """Send the standard library's records through the same processors (libraries log through
    ``logging``; their noise stays at warning level and above)."""
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name,
                           structlog.stdlib.ExtraAdder()],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *tail],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)


def _log_uncaught(kind: type[BaseException], value: BaseException,
                  traceback: TracebackType | None) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, value, traceback)
        return
    log: Any = structlog.get_logger("relay")
    log.critical("uncaught_exception", exc_info=(kind, value, traceback))
