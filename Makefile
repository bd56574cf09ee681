# One entry for every chore. `make run` and `make test` work on a fresh machine:
# they create .venv from requirements.lock first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/ku: pyproject.toml requirements.lock
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements.lock
	$(BIN)/pip install -q --no-deps -e .
	@touch $@

.PHONY: install run test lint bench lock
install: $(BIN)/ku

run: install  ## migrate and run the whole suite (gateway on 127.0.0.1:8000)
	$(BIN)/ku up

test: install  ## the full test suite against real Postgres and Redis
	$(BIN)/pytest $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check services gateway tests bench client
	$(BIN)/ruff format --check services gateway tests bench client
	$(BIN)/mypy

bench: install
	$(BIN)/python bench/ledger.py
	$(BIN)/python bench/gateway.py
	$(BIN)/python bench/generation.py
	$(BIN)/python bench/enhancement.py

lock:  ## re-resolve requirements.lock from pyproject.toml
	$(BIN)/pip install -q uv && $(BIN)/uv pip compile pyproject.toml --extra dev --extra embedded -o requirements.lock --python-version 3.11
