# Two set-up commands, both safe on a fresh machine:
#   make serve   create .venv, install, start the service on the embedded default model
#   make test    create .venv, install (with test tools and chromium), run the test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install install-dev serve test test-slow lint format bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# On a machine with an NVIDIA GPU, the `gpu` extra too (torchao, for --quant fp8).
install: $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e .
	if command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/pip install -q -e '.[gpu]'; fi

install-dev: $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	bash scripts/install-browser.sh

serve: install
	$(BIN)/diffstream serve --host $(HOST) --port $(PORT)

# A skipped test fails the run (tests/conftest.py), except tests marked gpu.
# Slow-marked checks (thousands of blocks: flat cost, the 3,000-frame drift table; ~15 min on
# 2 cores) are left to `make test-slow`, so `make test` stays well under 25 minutes.
test: install-dev
	$(BIN)/ruff check .
	DIFFSTREAM_STRICT_SKIPS=1 $(BIN)/python -m pytest -q -m "not slow"

test-slow: install-dev
	DIFFSTREAM_STRICT_SKIPS=1 $(BIN)/python -m pytest -q -m slow

lint: install-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format:
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: install
	$(BIN)/diffstream bench

clean:
	rm -rf $(VENV) build *.egg-info
