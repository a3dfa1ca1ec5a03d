# One command each: `make test` runs ruff and the test suite, `make grok` the main
# experiment. Both create .venv and install the project with its extras first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install test grok lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[dev]'
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest -n 2 --durations=15

grok: $(STAMP)
	$(PY) -m experiments.grokking $(ARGS)

bench: $(STAMP)
	$(PY) -m benchmarks.step_time $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
