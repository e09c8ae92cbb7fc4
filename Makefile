# Two commands matter: `make run` and `make test`. Everything installs into .venv from PyPI, at
# the exact versions (and hashes) of uv.lock as exported to requirements/dev.txt.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.DEFAULT_GOAL := run
.PHONY: run demo test test-fast install lint clean scale bench bench-quick faults web-deps lock

# --no-deps: the lock lists every package already (pip would otherwise trip over extras that a
# dependency asks for, such as redis[hiredis], in hash-checking mode); `pip check` proves it.
$(STAMP): pyproject.toml requirements/dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --no-deps --require-hashes -r requirements/dev.txt
	$(BIN)/pip install --quiet --no-deps -e .
	@$(BIN)/pip check || { echo "the lock does not satisfy pyproject.toml: run make lock"; exit 1; }
	touch $(STAMP)

# After a change of pyproject.toml's dependencies: resolve again, export what the image
# (requirements/service.txt) and the dev environment (requirements/dev.txt) install.
lock:
	$(BIN)/uv lock
	$(BIN)/uv export --frozen --no-emit-project --no-dev --format requirements-txt \
		-o requirements/service.txt -q
	$(BIN)/uv export --frozen --no-emit-project --no-dev --extra dev --format requirements-txt \
		-o requirements/dev.txt -q

# The web client's one dependency (@msgpack/msgpack, pinned by its package-lock.json), for the
# demo page and the browser tests; skipped with a note where npm is missing.
WEB := relay/client/web
WEB_STAMP := $(WEB)/node_modules/.installed

$(WEB_STAMP): $(WEB)/package-lock.json
	@if command -v npm >/dev/null; then \
		npm ci --prefix $(WEB) --silent --no-audit --no-fund && touch $(WEB_STAMP); \
	else echo "npm not found: the web demo and the web client tests are off (apt-get install nodejs npm)"; fi

web-deps: $(WEB_STAMP)

install: $(STAMP) $(WEB_STAMP)

run: $(STAMP) $(WEB_STAMP)
	$(BIN)/relay run $(ARGS)

demo: $(STAMP)
	$(BIN)/relay demo $(ARGS)

test: $(STAMP) $(WEB_STAMP)
	$(BIN)/python -m pytest -q

# The gates CI enforces: ruff over everything, mypy --strict over the product and the dev tooling.
lint: $(STAMP)
	$(BIN)/ruff check relay workers tests
	$(BIN)/mypy relay workers

# While iterating: everything but the multi-process end-to-end tests (`make test` runs them all).
test-fast: $(STAMP) $(WEB_STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

# Bounded load on this machine, loopback only (under 10 minutes): JSON in bench/results/,
# a table on stdout, and the figures appended to docs/benchmarks.md.
bench: $(STAMP)
	$(BIN)/relay bench --record docs/benchmarks.md
	$(BIN)/relay bench --latency --record docs/benchmarks.md
	$(BIN)/relay bench --append-cost --instructions

bench-quick: $(STAMP)
	$(BIN)/relay bench --quick

clean:
	rm -rf $(VENV) .run .pytest_cache

# How one edge's Redis connections, Redis commands per message and memory grow with clients.
scale: $(STAMP)
	$(BIN)/python -m relay.dev.bench.scale --clients 100,1000,5000

# Every fault of tests/faults (Redis frozen, restarted, killed; producers and edges SIGKILLed and
# SIGSTOPped; client drops, a slow client) with 30 conversations, loopback only (~5 minutes).
faults: $(STAMP)
	$(BIN)/python -m tests.faults
