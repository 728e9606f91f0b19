# Two set-up commands, both safe on a fresh machine:
#   make serve   create .venv, install, start the service on the embedded default model
#   make test    create .venv, install (with test tools and chromium), run the test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install install-dev serve test lint format bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e .

install-dev: $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	bash scripts/install-browser.sh

serve: install
	$(BIN)/diffstream serve --host $(HOST) --port $(PORT)

# A skipped test fails the run (tests/conftest.py), except tests marked gpu.
test: install-dev
	$(BIN)/ruff check .
	DIFFSTREAM_STRICT_SKIPS=1 $(BIN)/python -m pytest -q

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
