# `make demo` and `make test` work on a fresh machine: they create .venv and install the project first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Corpora are found through DATAEFF_DATA_DIR; the shared data sits beside the repository.
export DATAEFF_DATA_DIR ?= $(abspath ../shared/data)

.PHONY: install demo test test-fast test-slow lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[dev,ray,eval,track]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/python -m dataeff.demo

lint: install
	$(BIN)/ruff check src tests bench

# The default suite, plus the slow tests that guard the contracts (resumption, DDP, HF round trip).
test: install lint
	$(BIN)/pytest -n 2 -m "not slow" tests
	$(BIN)/pytest -n 2 -m slow tests

test-fast: install
	$(BIN)/pytest -n 2 -m "not slow" tests

bench: install
	$(BIN)/python bench/train_throughput.py --quick

clean:
	rm -rf $(VENV) runs cache .pytest_cache
