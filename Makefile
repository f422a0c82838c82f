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

.PHONY: chat test test-slow bench models models-bench venv ipex-venv test-ipex clean help

help:
	@echo "make chat       chat with the built-in demo model (sets everything up)"
	@echo "make test       run the test suite (sets everything up)"
	@echo "make test-slow  the slow tests (CI runs them too)"
	@echo "make bench      benchmark the demo model"
	@echo "make models     build the demo and test models into $(MODELS)/"
	@echo "make ipex-venv  optional: .venv-ipex with torch 2.8 + IPEX 2.8 for --backend ipex (~7 GB)"
	@echo "make test-ipex  the IPEX backend tests, in .venv-ipex (CI runs them too)"
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

# The optional IPEX backend lives in its own env: IPEX 2.8 (its last release) pins torch 2.8 and its
# LLM path validates transformers 4.51.3; every package of it is pinned in requirements-ipex.txt (the env
# is reinstalled when that file changes). PyPI's torch 2.8 is the CUDA build: ~4 GB download, 6.9 GB env;
# it runs on CPU. Not part of `make test`; .ci/run runs `make test-ipex`.
IPEX_VENV ?= .venv-ipex

$(IPEX_VENV)/.installed: pyproject.toml requirements-ipex.txt
	$(PYTHON) -m venv $(IPEX_VENV)
	$(IPEX_VENV)/bin/python -m pip install --quiet -r requirements-ipex.txt
	$(IPEX_VENV)/bin/python -m pip install --quiet --no-deps -e .
	touch $@

ipex-venv: $(IPEX_VENV)/.installed

# QWEN_RUNNER_REQUIRE_IPEX=1: in this env a test that would skip (IPEX unusable, no main env for the
# references) fails instead. The references run in the main env, so it needs `make venv` too.
test-ipex: $(IPEX_VENV)/.installed $(VENV)/.installed models
	QWEN_RUNNER_REQUIRE_IPEX=1 QWEN_RUNNER_REFERENCE_PYTHON=$(abspath $(PY)) \
		$(IPEX_VENV)/bin/python -m pytest tests/test_backend_ipex.py $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(IPEX_VENV) $(MODELS) .pytest_cache .hypothesis *.egg-info
