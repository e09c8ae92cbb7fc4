"""The layout is the architecture: each layer imports only the layers below it.

Bottom to top: the relay core; the edge and the clients (side by side, neither knows the other);
the producer side (``workers.speech``, then ``workers.queue`` above it, then the adapters and the
producer role); the development tooling (``relay.dev``); the CLI, the one composition root.

Read from the source with ``ast``, so a lazy import inside a function counts like any other: the
only module allowed to import a higher layer lazily is the CLI, which imports each role's code
inside the branch that runs it. A second test starts a fresh interpreter per role and checks that
no dev module is loaded.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Layer of each module prefix (longest prefix wins) and the layers each one may import.
LAYERS: dict[str, str] = {
    "relay": "core",
    "relay.edge": "edge",
    "relay.client": "client",
    "workers": "workers",
    "workers.errors": "speech",
    "workers.metrics": "speech",  # metric definitions, called from every producer layer
    "workers.speech": "speech",
    "workers.queue": "queue",
    "workers.adapters": "adapters",
    "relay.dev": "dev",
    "relay.cli": "cli",
    "relay.__main__": "cli",
}
ALLOWED: dict[str, set[str]] = {
    "core": {"core"},
    "edge": {"core", "edge"},
    "client": {"core", "client"},
    "speech": {"core", "speech"},
    "queue": {"core", "speech", "queue"},
    "adapters": {"core", "speech", "queue", "adapters"},
    "workers": {"core", "speech", "queue", "workers"},
    "dev": {"core", "edge", "client", "speech", "queue", "workers", "dev"},
    "cli": set(LAYERS.values()),
}


def layer_of(module: str) -> str | None:
    best = None
    for prefix in LAYERS:
        if (module == prefix or module.startswith(prefix + ".")) and (
            best is None or len(prefix) > len(best)
        ):
            best = prefix
    return LAYERS[best] if best else None


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported(tree: ast.AST, package: str) -> list[tuple[int, str, bool]]:
    """(line, module, at top level) for every import of a relay or workers module."""
    found: list[tuple[int, str, bool]] = []
    top = {id(node) for node in getattr(tree, "body", [])}
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        for name in names:
            if layer_of(name) is not None:
                found.append((node.lineno, name, id(node) in top))
    return found


def product_sources() -> list[Path]:
    return sorted(p for d in ("relay", "workers") for p in (ROOT / d).rglob("*.py"))


def violations() -> list[str]:
    bad: list[str] = []
    for path in product_sources():
        module = module_name(path)
        layer = layer_of(module)
        assert layer is not None, module
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        tree = ast.parse(path.read_text(), str(path))
        for line, name, _top in imported(tree, package):
            target = layer_of(name)
            if target is None or target in ALLOWED[layer]:
                continue
            bad.append(f"{path.relative_to(ROOT)}:{line}: {layer} imports {name} ({target})")
        if layer == "cli":
            for line, name, top in imported(tree, package):
                if top and layer_of(name) not in {"core", "cli"}:
                    bad.append(f"{path.relative_to(ROOT)}:{line}: the CLI imports {name} at "
                               "module level; roles are imported in the branch that runs them")
    return bad


def test_no_layer_imports_a_higher_one() -> None:
    assert violations() == []


def test_the_checker_catches_an_upward_import(tmp_path: Path) -> None:
    tree = ast.parse("import workers\nfrom relay.dev.stack import LocalStack\n")
    targets = {layer_of(name) for _, name, _ in imported(tree, "relay")}
    assert not targets <= ALLOWED["core"]
    assert layer_of("relay.keys") == "core" and layer_of("relay.dev.bench.steps") == "dev"
    assert layer_of("workers.queue.submit") == "queue" and layer_of("relay.edge.hub") == "edge"


_PROBE = """
import json, sys
for name in sys.argv[1:]:
    __import__(name)
print(json.dumps(sorted(sys.modules)))
"""


@pytest.mark.parametrize("entry", [
    ["relay.cli", "relay.edge.run"],
    ["relay.cli", "workers.run"],
    ["workers.queue", "relay.tokens"],
])
def test_role_processes_load_no_dev_module(entry: list[str]) -> None:
    out = subprocess.run([sys.executable, "-c", _PROBE, *entry], check=True, cwd=ROOT,
                         capture_output=True, text=True).stdout
    loaded = json.loads(out)
    assert [m for m in loaded if m.startswith("relay.dev")] == []
    if entry[0] == "workers.queue":
        # Submitting a turn needs a Redis client, not the Spatius SDK.
        assert [m for m in loaded if m == "spatius" or m.startswith("workers.speech.session")] == []
