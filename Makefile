# The two commands of the README:  `make run`  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
OUT    ?= out

.PHONY: setup setup-dev run test test-fast lint soak validate clean bench bench-quick

# The project itself is installed editable (its dependencies are requirements.txt, already there):
# that registers the `dlp-pipeline` command, the built-in plugins' entry points and the pytest plugin,
# so docs/plugins.md works from any folder.
$(VENV)/.runtime: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

$(VENV)/.dev: $(VENV)/.runtime requirements-dev.txt
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

# Azurite (Azure Storage emulator) for the integration tests when no Docker engine is present.
AZURITE := .tools/node_modules/.bin/azurite
$(AZURITE):
	npm install --silent --no-audit --no-fund --prefix .tools azurite@3

setup: $(VENV)/.runtime

setup-dev: $(VENV)/.dev $(AZURITE)

## Set up, then run the pipeline on the bundled samples with the embedded defaults (SQLite, ./out).
run: setup
	$(PY) -m pipeline run --out $(OUT)

validate: setup
	$(PY) -m pipeline validate

## Set up, then run the whole test suite.
test: setup-dev
	$(PY) -m pytest

## The inner loop: the suite without the tests marked slow (each over about 3 s: package builds, the SIGKILL run...).
test-fast: setup-dev
	$(PY) -m pytest -m "not slow"

## Lint and type-check, as pyproject.toml configures them: ruff over the repository, mypy over pipeline/ and enrichers/.
lint: setup-dev
	$(PY) -m ruff check .
	$(PY) -m mypy

## Benchmarks (figures, not pass/fail): `make bench` for the README figures, `make bench-quick` in CI.
bench: setup-dev
	$(PY) -m benchmarks --json

bench-quick: setup-dev
	$(PY) -m benchmarks --quick --json

## The long soak run of docs/delivery.md: 100,000 alerts, one sink failing a fifth of its calls.
soak: setup-dev
	$(PY) -m tests.soak --alerts 100000

clean:
	rm -rf $(OUT) .pytest_cache .mypy_cache .ruff_cache

## Start Azurite for `func start` (docs/deploy.md, "Run the Functions app locally").
.PHONY: azurite
azurite: $(AZURITE)
	scripts/start-azurite.sh
