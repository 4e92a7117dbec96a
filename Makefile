# The README's two quick-start commands: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

LINTED := src tests $(wildcard bench)

.PHONY: run test lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

## run wardgate on its embedded defaults (127.0.0.1:8766, authenticated mode)
run: $(STAMP)
	$(BIN)/wardgate serve

# The tests that start daemons run once per store backend (the store's own tests are
# parametrized over both, and the rest does not touch a store).
DAEMON_TESTS := tests/e2e tests/test_findings.py tests/test_client.py

# Tests start private redis-server processes (fault injection) besides using the machine's Redis.
SUDO := $(shell [ "$$(id -u)" = 0 ] || command -v sudo)

## lint, type-check and run the whole test suite (daemon tests on SQLite, then on Redis)
test: $(STAMP)
	@command -v redis-server >/dev/null 2>&1 || \
	  $(SUDO) sh -c 'apt-get update -qq && apt-get install -y -qq redis-server >/dev/null'
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)
	$(BIN)/mypy
	$(BIN)/pytest
	$(BIN)/pytest --store-backend=redis $(DAEMON_TESTS)

lint: $(STAMP)
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
