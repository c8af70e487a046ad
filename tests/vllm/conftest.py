"""Fixtures of the vllm tier (`make test-vllm`; needs the vLLM venv, see docs/vllm.md).

- `vllm_python`: the vLLM venv's interpreter (teacher.vllm_python / $STILLHOUSE_VLLM_PYTHON /
  <repo>/.venv-vllm/bin/python). Never skips: a test in this tier that cannot find vLLM fails with
  the message saying how to create the venv, so a broken setup cannot pass as "all skipped".
- `vllm_model_dir`: the session's `tiny-tutor` (tests/conftest.py `tutor_dir`: a tiny Llama briefly
  trained on arithmetic chat), checked to have head_dim 64, the only head size vLLM's CPU attention
  kernels take. Trained rather than random on purpose: the random `tiny_model_dir` decodes greedily
  to one token repeated, which makes cross-backend parity trivially true; the tutor writes varied
  text that ends with EOS, hits stop strings and runs into max_new_tokens.
- `vllm_cpu_engine`: engine settings that suit a shared CPU machine (small memory share, no
  torch.compile warm-up); pass them to VLLMBackend(**vllm_cpu_engine).
- `vllm_backend`: one VLLMBackend (one engine) on `vllm_model_dir` shared by the session, since an
  engine start costs ~30 s here. cleanup=True: every call generates afresh (no shard file reuse),
  so repeated calls test the engine, not the shard cache.

Names are stable: tests/vllm/test_openai_vllm_serve.py uses them too.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def vllm_python() -> Path:
    from stillhouse.tasks.backends.vllm import resolve_vllm_python

    try:
        return Path(resolve_vllm_python(None))
    except FileNotFoundError as err:
        pytest.fail(f"{err}\n(run `make test-vllm`, which creates .venv-vllm first)", pytrace=False)


@pytest.fixture(scope="session")
def vllm_model_dir(tutor_dir) -> Path:
    cfg = json.loads((Path(tutor_dir) / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    assert head_dim == 64, f"vLLM's CPU kernels need head_dim 64, the tiny model has {head_dim}"
    return Path(tutor_dir)


# On CPU, gpu_memory_utilization is the share of *host* memory the engine reserves (KV cache
# included): the default 0.9 fails on a shared machine. 0.1 of ~20 GiB leaves ~1.3 GiB of KV cache,
# far more than the tiny model needs. enforce_eager skips torch.compile's warm-up (~50 s per engine
# start on two cores); it does not change the math.
CPU_ENGINE = {
    "gpu_memory_utilization": 0.1,
    "max_model_len": 512,
    "engine_args": {"enforce_eager": True},
}


@pytest.fixture(scope="session")
def vllm_cpu_engine() -> dict:
    return {**CPU_ENGINE, "engine_args": dict(CPU_ENGINE["engine_args"])}


@pytest.fixture(scope="session")
def vllm_backend(vllm_model_dir, vllm_python, vllm_cpu_engine, tmp_path_factory):
    from stillhouse.tasks.backends.vllm import VLLMBackend

    b = VLLMBackend(vllm_model_dir, work_dir=tmp_path_factory.mktemp("vllm-work"), vllm_python=str(vllm_python),
                    cleanup=True, **vllm_cpu_engine)
    yield b
    b.close()
