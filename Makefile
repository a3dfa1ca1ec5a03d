# One command each: `make test` runs ruff, the docs build and the test suite, `make grok`
# the main experiment. Both create .venv and install the project with its extras first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# The development machines' PyTorch build; users of the `torch` extra take any torch>=2.4.
TORCH ?= torch==2.13.0

.PHONY: install test grok lint docs bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install '$(TORCH)'
	$(PY) -m pip install -e '.[dev]'
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The documentation site, offline and strict (docs/building.md).
docs: $(STAMP)
	$(PY) -m sphinx -b html -E -W --keep-going -n docs build/docs/html

test: lint docs
	$(PY) -m pytest -n 2 --durations=15

grok: $(STAMP)
	$(PY) -m experiments.grokking $(ARGS)

bench: $(STAMP)
	$(PY) -m benchmarks.step_time $(ARGS)

clean:
	rm -rf $(VENV) build .pytest_cache .ruff_cache
