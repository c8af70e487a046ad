"""The hf backend on the tiny model: per-request reproducibility, greedy parity, accounting, stops."""

from __future__ import annotations

import json
import shutil

import pytest

from stillhouse.tasks.backends.base import SampleRequest, SamplingParams, derive_seed
from stillhouse.tasks.config import PromptsConfig, SamplingConfig
from stillhouse.tasks.backends.hf import HFBackend, _make_gumbel_processor
from stillhouse.tasks.prompts import solve_requests
from stillhouse.tasks.problems import Problem
from stillhouse.tasks.prompts import PLAIN_TEXT_STOP

pytestmark = pytest.mark.integration

QUESTIONS = [
    "What is 2 + 3?",
    "Ann has 5 apples. Ben has 7 more apples than Ann. How many apples does Ben have?",
    "x",
    "Compute 12 * 13 and give the answer in \\boxed{}.",
    "Cara has 40 coins and gives away 15 of them to Dev and 3 to Eli. How many coins are left?",
]
T1 = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=12)


def req(q: int, i: int, seed_base: int = 0) -> SampleRequest:
    key = f"q{q}"
    return SampleRequest(key, i, ({"role": "user", "content": QUESTIONS[q]},), derive_seed(seed_base, key, i))


@pytest.fixture(scope="module")
def backend(tiny_model_dir):
    b = HFBackend(tiny_model_dir, batch_size=4)
    yield b
    b.close()


def texts(completions):
    return [c.text for c in completions]


def test_completions_follow_request_order_and_report_progress(backend):
    reqs = [req(q, i) for q in range(5) for i in range(2)]
    seen = []
    out = backend.sample(reqs, T1, progress=lambda d, t: seen.append((d, t)))
    assert [(c.key, c.sample_index) for c in out] == [(r.key, r.sample_index) for r in reqs]
    assert seen == [(4, 10), (8, 10), (10, 10)]
    assert backend.sample([], T1) == []


def test_same_seeds_same_texts_different_index_different_texts(backend):
    reqs = [req(1, i) for i in range(4)]
    a, b = backend.sample(reqs, T1), backend.sample(reqs, T1)
    assert texts(a) == texts(b)
    assert len(set(texts(a))) == 4  # 12 tokens from a near-uniform 512-way choice: never collide


def test_request_gives_the_same_text_in_any_batch(backend, tiny_model_dir):
    params = SamplingParams(temperature=0.8, top_p=0.9, max_new_tokens=12)
    target = req(1, 3)
    alone = backend.sample([target], params)[0]
    mixes = [
        [req(0, 0), target, req(2, 1), req(4, 0)],  # shorter and longer prompts: padding differs
        [req(4, 1), req(4, 2), req(3, 0), req(2, 2), target, req(0, 5)],  # other batch position
        [target] * 3,  # duplicates of itself
    ]
    for mix in mixes:
        got = backend.sample(mix, params)
        assert all(c.text == alone.text for c, r in zip(got, mix) if r == target)
    other = HFBackend(tiny_model_dir, batch_size=1)  # a different batch size, fresh backend
    try:
        assert other.sample([req(2, 0), target], params)[1].text == alone.text
    finally:
        other.close()


def test_greedy_equals_plain_generate(backend):
    import torch

    reqs = [req(q, 0) for q in range(5)]
    params = SamplingParams(temperature=0, max_new_tokens=10)
    out = backend.sample(reqs, params)
    for r, c in zip(reqs, out):
        ids = backend.encode(r.messages)
        with torch.inference_mode():
            ref = backend.model.generate(
                input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=10, do_sample=False,
            )
        new = ref[0, len(ids):].tolist()
        eos = [j for j, t in enumerate(new) if t in backend.eos_ids]
        expect = new[: eos[0]] if eos else new
        assert c.text == backend.tokenizer.decode(expect, skip_special_tokens=True)
        assert c.prompt_tokens == len(ids)


def test_gumbel_max_samples_the_top_p_distribution():
    import torch
    from transformers import TopPLogitsWarper

    sampler_cls = _make_gumbel_processor()
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    rows = 20000
    temp, top_p = 0.7, 0.9
    sampler = sampler_cls(range(rows), temp, top_p, "cpu")
    scores = sampler(None, logits.repeat(rows, 1))
    picks = scores.argmax(-1)
    freq = torch.bincount(picks, minlength=6).float() / rows
    expected = TopPLogitsWarper(top_p)(None, logits / temp).softmax(-1)[0]
    assert torch.allclose(freq, expected, atol=0.015), (freq, expected)
    assert freq[expected == 0].sum() == 0  # the cut tail is never drawn
    # Each row's noise comes from its own generator: a row's draw does not depend on the others.
    again = sampler_cls([5], temp, top_p, "cpu")(None, logits)
    assert torch.equal(again[0], scores[5])


def test_length_accounting_and_finish_reason(backend):
    out = backend.sample([req(q, 0) for q in range(5)], SamplingParams(temperature=0, max_new_tokens=7))
    for c in out:
        assert c.finish_reason == "length" and c.completion_tokens == 7


def test_eos_stops_and_is_counted(tiny_model_dir, tmp_path):
    # Make the 5th token of a known sample an EOS: the sample must stop there, EOS counted once.
    probe = HFBackend(tiny_model_dir, batch_size=2)
    target = req(1, 0)
    tokens, _, _, _ = probe._generate([probe.encode(target.messages)], [target.seed], T1, ())[0]
    probe.close()
    stop_token = tokens[4]
    first = tokens.index(stop_token)
    folder = tmp_path / "tiny-eos"
    shutil.copytree(tiny_model_dir, folder)
    gen = json.loads((folder / "generation_config.json").read_text())
    gen["eos_token_id"] = [*gen["eos_token_id"], stop_token]
    (folder / "generation_config.json").write_text(json.dumps(gen))

    b = HFBackend(folder, batch_size=4)
    try:
        assert stop_token in b.eos_ids
        out = b.sample([req(0, 1), target, req(4, 2)], T1)
        c = out[1]
        assert c.finish_reason == "stop" and c.completion_tokens == first + 1
        assert c.text == b.tokenizer.decode(tokens[:first], skip_special_tokens=True)
        for other in (out[0], out[2]):  # batch-mates keep going (or stop on their own EOS)
            assert other.completion_tokens <= 12
            assert (other.finish_reason == "length") == (other.completion_tokens == 12)
    finally:
        b.close()


def test_stop_strings_truncate_and_count(backend):
    long = SamplingParams(temperature=1.0, max_new_tokens=24)
    target = req(3, 2)
    full = backend.sample([target], long)[0]
    assert full.finish_reason == "length" and len(full.text) > 12
    # A 3-character ASCII window (random bytes can decode to U+FFFD, which later bytes may complete).
    start = next(i for i in range(6, len(full.text) - 3) if full.text[i : i + 3].isascii())
    stop = full.text[start : start + 3]
    cut = full.text.find(stop)
    params = SamplingParams(temperature=1.0, max_new_tokens=24, stop=("never-there", stop))
    out = backend.sample([req(0, 0), target], params)
    c = out[1]
    assert c.text == full.text[:cut] and c.finish_reason == "stop"
    assert 1 <= c.completion_tokens < full.completion_tokens
    # completion_tokens = the shortest prefix of the unstopped sample that holds the stop string.
    tokens, _, _, _ = backend._generate([backend.encode(target.messages)], [target.seed], long, ())[0]
    dec = backend.tokenizer.decode
    assert c.completion_tokens == next(
        k for k in range(1, len(tokens) + 1) if stop in dec(tokens[:k], skip_special_tokens=True)
    )


def test_plain_text_fallback_without_chat_template(tiny_model_dir, tmp_path):
    folder = tmp_path / "tiny-plain"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "chat_template.jinja").unlink()
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    b = HFBackend(folder, batch_size=2)
    try:
        assert not b.uses_chat_template
        assert b.render(req(0, 0).messages) == f"Question: {QUESTIONS[0]}\nAnswer:"
        c = b.sample([req(0, 0)], T1)[0]
        assert PLAIN_TEXT_STOP[0] not in c.text
        # An explicit template turns chat rendering back on.
        b2_template = "{% for m in messages %}<|im_start|>{{ m['content'] }}{% endfor %}"
        b.chat_template, b.uses_chat_template = b2_template, True
        assert b.render(req(0, 0).messages) == f"<|im_start|>{QUESTIONS[0]}"
    finally:
        b.close()


def test_solve_requests_n_per_problem_with_derived_seeds(backend):
    problems = [Problem.make(QUESTIONS[1], "12", "t"), Problem.make(QUESTIONS[4], "22", "t")]
    cfg = SamplingConfig(n=3, temperature=0.7, top_p=0.95, max_new_tokens=8, seed=11)
    params = SamplingParams.from_config(cfg)
    out = backend.sample(solve_requests(problems, 3, cfg.seed, PromptsConfig()), params)
    assert [(c.key, c.sample_index) for c in out] == [(p.id, i) for p in problems for i in range(3)]
    assert [c.extra["seed"] for c in out] == [derive_seed(11, p.id, i) for p in problems for i in range(3)]
    again = backend.sample(solve_requests(problems[1:], cfg.n, cfg.seed, PromptsConfig()), params)
    assert texts(again) == texts(out[3:])
    scoped = backend.sample(solve_requests(problems[:1], 1, cfg.seed, PromptsConfig(), seed_scope="round-1/"), params)
    assert scoped[0].extra["seed"] == derive_seed(11, f"round-1/{problems[0].id}", 0)


def test_adapter_is_merged_and_matches_the_peft_model(tiny_model_dir, tmp_path):
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    # init_lora_weights=False: random B, so the adapter really changes the outputs.
    peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj", "down_proj"],
                                           init_lora_weights=False))
    peft.save_pretrained(tmp_path / "adapter")
    b = HFBackend(tiny_model_dir, batch_size=2, adapter_path=tmp_path / "adapter")
    plain = HFBackend(tiny_model_dir, batch_size=2)
    try:
        params = SamplingParams(temperature=0, max_new_tokens=8)
        reqs = [req(1, 0), req(3, 0)]
        got = b.sample(reqs, params)
        ref_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)),
                                              str(tmp_path / "adapter")).eval()
        for r, c in zip(reqs, got):
            ids = b.encode(r.messages)
            with torch.inference_mode():
                ref = ref_model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                         max_new_tokens=8, do_sample=False)
            assert c.text == b.tokenizer.decode(ref[0, len(ids):], skip_special_tokens=True)
        assert texts(got) != texts(plain.sample(reqs, params))
    finally:
        b.close()
        plain.close()


def test_close_frees_the_model(tiny_model_dir):
    b = HFBackend(tiny_model_dir, batch_size=1)
    b.close()
    assert b.model is None
    b.close()  # twice is fine
