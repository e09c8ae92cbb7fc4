"""What this process runs: the relay's version and its runtime, for the ``relay_build_info``
metric of every role and its start log line (operators match a misbehaving pod to a release)."""

from __future__ import annotations

import platform
from importlib import metadata

import redis

DISTRIBUTION = "avatar-relay"


def _version_of(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def relay_version() -> str:
    """The installed relay's version ("unknown" from a source tree never installed)."""
    return _version_of(DISTRIBUTION)


def build_facts(role: str, **extra: str) -> dict[str, str]:
    """Constant labels for one process: bounded by construction (one set per process)."""
    return {"role": role, "version": relay_version(),
            "python": platform.python_version(), "redis_py": redis.__version__, **extra}


def sdk_version() -> str:
    """The installed Spatius Server SDK's version (the producer's Motion Server client)."""
    return _version_of("spatius")
