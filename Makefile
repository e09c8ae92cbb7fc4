# Two commands matter: `make run` and `make test`. Everything installs into .venv from PyPI.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.DEFAULT_GOAL := run
.PHONY: run demo test install lint clean scale bench bench-quick

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# py-spy (profiles of the edge and the producer under load) is only needed by `make bench`.
BENCH_STAMP := $(VENV)/.bench-installed
$(BENCH_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e '.[test,bench]'
	touch $(BENCH_STAMP)

run: $(STAMP)
	$(BIN)/relay run

demo: $(STAMP)
	$(BIN)/relay demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

# Bounded load on this machine, loopback only (under 10 minutes): JSON in bench/results/,
# a table on stdout, and the figures appended to docs/benchmarks.md.
bench: $(BENCH_STAMP)
	$(BIN)/relay bench --record docs/benchmarks.md

bench-quick: $(STAMP)
	$(BIN)/relay bench --quick

clean:
	rm -rf $(VENV) .run .pytest_cache

# How one edge's Redis connections, Redis commands per message and memory grow with clients.
scale: $(STAMP)
	$(BIN)/python -m relay.bench.scale --clients 100,1000,5000
