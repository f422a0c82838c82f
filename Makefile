# The README's two commands are `make chat` and `make test`; each sets up everything it
# needs on a fresh machine (virtual env, package, models) and is cheap when already done.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
MODELS ?= models
PYTEST_ARGS ?=

# The OpenMP wait policy and threads for tests: PASSIVE (see docs/threads.md).
export OMP_WAIT_POLICY ?= PASSIVE
export QWEN_RUNNER_MODELS := $(abspath $(MODELS))

.PHONY: chat test test-slow bench models models-bench venv clean help

help:
	@echo "make chat       chat with the built-in demo model (sets everything up)"
	@echo "make test       run the test suite (sets everything up)"
	@echo "make test-slow  the slow tests (CI runs them too)"
	@echo "make bench      benchmark the demo model"
	@echo "make models     build the demo and test models into $(MODELS)/"
	@echo "make clean      remove the virtual env and built models"

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# Re-install when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

models: $(VENV)/.installed
	$(PY) scripts/make_test_models.py --out $(MODELS)

models-bench: $(VENV)/.installed
	$(PY) scripts/make_test_models.py --out $(MODELS) --only bench-qwen3-moe,bench-qwen3-next,bench-qwen3-moe-int4,bench-qwen3-next-int4

chat: $(VENV)/.installed
	$(PY) scripts/make_test_models.py --out $(MODELS) --only demo
	$(VENV)/bin/qwen-runner chat $(MODELS)/demo

test: $(VENV)/.installed-dev models
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# pytest exits 5 when no test carries the mark: not a failure.
test-slow: $(VENV)/.installed-dev models
	$(PY) -m pytest -m slow $(PYTEST_ARGS) || [ $$? -eq 5 ]

bench: $(VENV)/.installed
	$(PY) scripts/make_test_models.py --out $(MODELS) --only demo
	$(VENV)/bin/qwen-runner bench $(MODELS)/demo

clean:
	rm -rf $(VENV) $(MODELS) .pytest_cache .hypothesis *.egg-info
