"""The vllm backend on a real vLLM engine (CPU build in .venv-vllm) and the tiny tutor model.

One engine serves the session (conftest `vllm_backend`; an engine start is ~30 s on two cores);
the hf backend on the same folder is the reference. Prompts are GSM-style solve prompts, which the tutor answers with a
one-line rationale and EOS, and "write a harder problem" prompts, which it answers with longer,
varied text (samples of those never coincide by chance).
"""

from __future__ import annotations

import json
import os
import subprocess

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stillhouse.tasks.backends.base import SampleRequest, SamplingParams, derive_seed
from stillhouse.tasks.config import ModelConfig, PromptsConfig
from stillhouse.tasks.backends.hf import HFBackend
from stillhouse.tasks.prompts import harder_messages, solve_messages
from stillhouse.tasks.backends.vllm import REPO_ROOT

pytestmark = pytest.mark.vllm

PROMPTS = PromptsConfig()
QUESTIONS = [
    "Ann has 5 apples. Ben gives her 7 more. How many apples does Ann have now?",
    "What is 8 + 6?",
    "Cara has 40 coins and gives away 15 of them. How many coins are left?",
    "Dev buys 3 bags with 4 pens in each. How many pens does Dev have?",
    "Maya bakes 24 cupcakes on Monday and 6 more on Tuesday than on Monday. She sells 30 of them. "
    "How many cupcakes does she have left?",
]
T1 = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=40)


def solve(q: int, i: int = 0, base: int = 0) -> SampleRequest:
    key = f"s{q}"
    return SampleRequest(key, i, solve_messages(QUESTIONS[q], PROMPTS), derive_seed(base, key, i))


def harder(q: int, i: int = 0, base: int = 0) -> SampleRequest:
    key = f"h{q}"
    return SampleRequest(key, i, harder_messages(QUESTIONS[q], PROMPTS), derive_seed(base, key, i))


def mixed() -> list[SampleRequest]:
    return [solve(q) for q in range(5)] + [harder(q) for q in range(5)]


def outcome(c):
    return (c.key, c.sample_index, c.text, c.prompt_tokens, c.completion_tokens, c.finish_reason)


@pytest.fixture(scope="module")
def backend(vllm_backend):
    return vllm_backend


@pytest.fixture(scope="module")
def hf(vllm_model_dir):
    b = HFBackend(vllm_model_dir, batch_size=16)
    yield b
    b.close()


def test_n_completions_per_prompt_in_request_order(backend):
    n = 4
    reqs = [r for q in (0, 1, 4) for r in (solve(q, i) for i in range(n))]
    reqs += [harder(2, i) for i in range(n)]
    seen = []
    out = backend.sample(reqs, T1, progress=lambda d, t: seen.append((d, t)))
    assert [(c.key, c.sample_index) for c in out] == [(r.key, r.sample_index) for r in reqs]
    assert seen[-1] == (len(reqs), len(reqs))
    assert all(a[0] <= b[0] for a, b in zip(seen, seen[1:]))  # progress never goes back
    for r, c in zip(reqs, out):
        assert c.prompt_tokens == len(backend.encode(r.messages))
        assert c.finish_reason in ("stop", "length")
        assert 0 < c.completion_tokens <= T1.max_new_tokens
        assert c.extra["seed"] == r.seed
    # The N samples of the "harder" prompt are N different texts (long free text at T=1).
    assert len({c.text for c in out[-n:]}) == n
    assert backend.sample([], T1) == []


def test_same_seed_same_text_in_any_batch_and_seeds_matter(backend):
    target = harder(3, 1)
    alone = backend.sample([target], T1)[0]
    # Other prompts around it, other batch positions, copies of itself: the request's own seed
    # decides its text.
    mix = [solve(0), harder(0, 5), target, solve(4, 2), target, harder(1, 0)]
    got = backend.sample(mix, T1)
    assert [c.text for c, r in zip(got, mix) if r == target] == [alone.text, alone.text]
    again = backend.sample([target], T1)[0]
    assert outcome(again) == outcome(alone)
    # Same messages, different seeds: different texts.
    others = backend.sample([harder(3, i) for i in range(2, 6)], T1)
    assert all(c.text != alone.text for c in others)
    assert len({c.text for c in others}) == 4


def test_seeded_requests_beyond_one_step_token_budget(backend):
    """More prompt tokens than one engine step takes (4096 by default on CPU): with chunked prefill
    vLLM would split a seeded prompt over two steps and then rewind the request's generator, which
    only CUDA generators can do ("CPU Generator does not use offset", the engine dies). The worker
    turns chunked prefill off on CPU; this call must work and give each request its own text."""
    reqs = [harder(q % 5, i) for q in range(5) for i in range(16)]  # 80 prompts of ~70-100 tokens
    assert sum(len(backend.encode(r.messages)) for r in reqs) > 4096
    params = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=6)
    out = backend.sample(reqs, params)
    alone = backend.sample(reqs[-3:], params)
    assert [c.text for c in out[-3:]] == [c.text for c in alone]


def test_greedy_equals_hf_token_for_token(backend, hf):
    reqs = mixed()
    cases = [
        SamplingParams(temperature=0, max_new_tokens=60),  # ends at EOS
        SamplingParams(temperature=0, max_new_tokens=60, stop=("=",)),  # cut at a stop string
        SamplingParams(temperature=0, max_new_tokens=8),  # runs out of tokens
    ]
    reasons = []
    for params in cases:
        ours, ref = backend.sample(reqs, params), hf.sample(reqs, params)
        # Same prompt ids (the driver tokenizes like hf), same argmax at every step, same decode,
        # same cut and same counting: equal text, token counts and finish reasons.
        assert [outcome(c) for c in ours] == [outcome(c) for c in ref], params
        reasons.append([c.finish_reason for c in ours])
    # The three ways a completion ends were all exercised, so the accounting was compared for each.
    assert "stop" in reasons[0] and set(reasons[2]) == {"length"}
    eos_len = {c.key: c.completion_tokens for c in backend.sample(reqs, cases[0])}
    cut = backend.sample(reqs, cases[1])
    assert any(c.finish_reason == "stop" and c.completion_tokens < eos_len[c.key] and "=" not in c.text
               for c in cut)


def test_prompt_over_max_model_len_names_the_request(backend):
    long = SampleRequest("too-long", 3, ({"role": "user", "content": "7 + 8 = 15. " * 200},), 1)
    with pytest.raises(ValueError, match=r"'too-long' sample 3: the prompt has \d+ tokens.*max_model_len 512"):
        backend.sample([solve(0), long], T1)


def test_worker_cli_n_samples_use_seed_plus_index(backend, vllm_python, vllm_model_dir, vllm_cpu_engine, tmp_path):
    """The worker's one-shot mode with n=3 on one row: child i is seeded seed + i (vLLM's rule), so
    it equals the backend's single-sample requests with those seeds."""
    r = harder(4)
    ids = backend.encode(r.messages)
    rows = pa.table({
        "prompt_token_ids": pa.array([ids], pa.list_(pa.int32())),
        "n": pa.array([3], pa.int32()),
        "seed": pa.array([r.seed], pa.int64()),
        "temperature": [1.0], "top_p": [1.0],
        "max_tokens": pa.array([T1.max_new_tokens], pa.int32()),
        "stop": pa.array([[]], pa.list_(pa.string())),
        "stop_token_ids": pa.array([backend.eos_ids], pa.list_(pa.int32())),
    })
    pq.write_table(rows, tmp_path / "in.parquet")
    engine = {"model": str(vllm_model_dir), "max_model_len": vllm_cpu_engine["max_model_len"],
              "gpu_memory_utilization": vllm_cpu_engine["gpu_memory_utilization"],
              "engine_args": vllm_cpu_engine["engine_args"]}
    proc = subprocess.run(
        [str(vllm_python), "-m", "tasks.backends.vllm_worker", "--engine", json.dumps(engine),
         "--input", str(tmp_path / "in.parquet"), "--output", str(tmp_path / "out.parquet")],
        cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert [(o["row"], o["sample"]) for o in out] == [(0, 0), (0, 1), (0, 2)]
    singles = backend.sample([SampleRequest(r.key, i, r.messages, r.seed + i) for i in range(3)], T1)
    assert [(o["text"], o["completion_tokens"], o["finish_reason"]) for o in out] == [
        (c.text, c.completion_tokens, c.finish_reason) for c in singles]
    assert all(o["prompt_tokens"] == len(ids) and len(o["token_ids"]) == o["completion_tokens"] for o in out)


# --------------------------------------------------------------------------- student + LoRA


@pytest.fixture(scope="module")
def adapter_dir(vllm_model_dir, tmp_path_factory):
    """A PEFT LoRA adapter (rank 4, every projection) with non-zero, seeded weights.

    PEFT's default init makes B zero (the adapter starts as a no-op); init_lora_weights=False draws
    both A and B, and B is scaled down so the student still writes text, just different text.
    Rank 4 is not one of vLLM's max_lora_rank values: the backend must round it up to 8.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("adapter")
    model = AutoModelForCausalLM.from_pretrained(vllm_model_dir, dtype=torch.float32)
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False, task_type="CAUSAL_LM",
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        peft_model = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.1)
    peft_model.save_pretrained(out)
    return out


def test_student_eval_lora_request_equals_hf_peft(vllm_model_dir, vllm_python, vllm_cpu_engine, adapter_dir,
                                                   hf, tmp_path):
    """The student path of a round: BACKENDS['vllm'](model, batch, adapter) -> LoRARequest, unmerged;
    hf merges the same adapter. Greedy answers must agree, and differ from the base model's."""
    from stillhouse.tasks.backends.open import BACKENDS

    model = ModelConfig(
        name_or_path=str(vllm_model_dir), backend="vllm", vllm_python=str(vllm_python),
        gpu_memory_utilization=vllm_cpu_engine["gpu_memory_utilization"],
        max_model_len=vllm_cpu_engine["max_model_len"], vllm_engine_args=vllm_cpu_engine["engine_args"],
    )
    student = BACKENDS["vllm"](model, 16, str(adapter_dir), tmp_path)
    peft = HFBackend(vllm_model_dir, batch_size=16, adapter_path=adapter_dir)
    try:
        assert student.name == "vllm" and student.spec["adapter_path"] == str(adapter_dir)
        params = SamplingParams(temperature=0, max_new_tokens=60)
        reqs = mixed()
        ours, ref = student.sample(reqs, params), peft.sample(reqs, params)
        assert [outcome(c) for c in ours] == [outcome(c) for c in ref]
        # The factory's backend cleans its shard files up once a call returned.
        assert not list(tmp_path.glob("*.parquet"))
    finally:
        student.close()
        peft.close()
    base = hf.sample(reqs, params)
    changed = sum(a.text != b.text for a, b in zip(ours, base))
    assert changed >= 3, f"the adapter changed only {changed} of {len(reqs)} answers"
