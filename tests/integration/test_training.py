"""LoRA training with the weighted loss on the tiny random Llama: parity, signs, resume, learning."""

from __future__ import annotations

import json

import pytest

from stillhouse.tasks.config import LoraConfig, TrainingConfig
from stillhouse.tasks.training.checkpoints import ADAPTER_DIR, CHECKPOINTS_DIR
from stillhouse.tasks.training.data import TrainExample, collate, encode_examples
from stillhouse.tasks.training.trainer import (
    METRICS_FILE,
    TrainResult,
    batch_loss,
    load_base,
    match_target_modules,
    train_lora,
    wrap_lora,
)

pytestmark = pytest.mark.integration

torch = pytest.importorskip("torch")

PROBLEMS = [(2, 3), (10, 7), (4, 4), (21, 5), (13, 30)]


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


def _prompt(tok, a, b):
    return tok.apply_chat_template(
        [{"role": "user", "content": f"What is {a} + {b}?"}], tokenize=False, add_generation_prompt=True
    )


def _cfg(**kw):
    base = dict(learning_rate=5e-3, schedule="constant", warmup_ratio=0.0, batch_size=4, epochs=1,
                max_length=64, checkpoint_every=1000, seed=0)
    base.update(kw)
    return TrainingConfig(**base)


def _lora(**kw):
    return LoraConfig(**{"rank": 8, "alpha": 16, "dropout": 0.0, **kw})


def _peft_model(path, lora=None, seed=0):
    torch.manual_seed(seed)
    return wrap_lora(load_base(path, torch.float32, "cpu"), lora or _lora(), None)


def load_student(base_model_path, adapter_dir, *, device="cpu"):
    """Base model + trained LoRA adapter, unmerged, in eval mode: what the trainer saved, as PEFT
    loads it (the pipeline's hf backend merges the adapter instead; merged logits are not bit-equal)."""
    from peft import PeftModel

    base = load_base(base_model_path, torch.float32, device)
    base.config.use_cache = True
    return PeftModel.from_pretrained(base, str(adapter_dir)).to(device).eval()


def _batch(tok, examples, max_length=64):
    enc = encode_examples(tok, examples, max_length)
    return collate(enc, list(range(len(enc.input_ids))), tok.pad_token_id)


def _sample_nll(model, tok, examples):
    from stillhouse.tasks.training.loss import sample_mean_nll

    ids, mask, labels, _ = _batch(tok, examples)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    return sample_mean_nll(logits, labels)


def _adapter_tensors(adapter_dir):
    from safetensors.torch import load_file

    return load_file(str(adapter_dir / "adapter_model.safetensors"))


def _examples(tok, weights=None):
    weights = weights or [1.0] * len(PROBLEMS)
    return [TrainExample(_prompt(tok, a, b), f"The answer is {a + b}.", w) for (a, b), w in zip(PROBLEMS, weights)]


# --------------------------------------------------------------------------- loss parity and signs


def test_unit_weight_loss_equals_model_causal_lm_loss(tiny_model_dir, tok):
    model = _peft_model(tiny_model_dir)
    model.eval()
    examples = _examples(tok)
    ids, mask, labels, w = _batch(tok, examples)
    assert len({int(m.sum()) for m in mask}) > 1  # different lengths: padding is exercised
    with torch.no_grad():
        hf_per_sample = []
        for i in range(len(examples)):
            n = int(mask[i].sum())
            out = model(input_ids=ids[i : i + 1, :n], labels=labels[i : i + 1, :n])
            hf_per_sample.append(out.loss)
        expected = torch.stack(hf_per_sample).mean()
        for mask_logits in (True, False):
            ours = batch_loss(model, ids, mask, labels, torch.ones(len(examples)), mask_logits=mask_logits)
            assert ours.item() == pytest.approx(expected.item(), rel=1e-5)
        # The single-sample case is exactly the model's own loss.
        one = batch_loss(model, ids[:1], mask[:1], labels[:1], torch.ones(1))
        assert one.item() == pytest.approx(hf_per_sample[0].item(), rel=1e-5)


def test_zero_weight_batch_changes_no_parameter(tiny_model_dir, tok):
    model = _peft_model(tiny_model_dir)
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    ids, mask, labels, _ = _batch(tok, _examples(tok))
    loss = batch_loss(model, ids, mask, labels, torch.zeros(len(PROBLEMS)))
    assert loss.item() == 0.0
    loss.backward()
    assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in params)
    opt.step()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_all_zero_weights_train_nothing_and_save_the_initial_adapter(tiny_model_dir, tok, tmp_path):
    from transformers import AutoModelForCausalLM

    res = train_lora(tiny_model_dir, _examples(tok, [0.0] * 5), tmp_path / "run", _cfg(), _lora())
    assert (res.steps, res.samples_used, res.samples_skipped_zero_weight) == (0, 0, 5)
    student = load_student(tiny_model_dir, res.adapter_dir, device="cpu")
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    ids, mask, _, _ = _batch(tok, _examples(tok))
    with torch.no_grad():  # a fresh LoRA has B = 0: the student is the base model
        assert torch.equal(student(input_ids=ids, attention_mask=mask).logits, base(input_ids=ids, attention_mask=mask).logits)


@pytest.mark.parametrize("weight, negative_loss", [(-1.0, "nll"), (-1.0, "unlikelihood"), (1.0, "unlikelihood")])
def test_weight_sign_moves_the_sample_likelihood(tiny_model_dir, tok, tmp_path, weight, negative_loss):
    ex = _examples(tok)[:1]
    base = _peft_model(tiny_model_dir)
    before = _sample_nll(base, tok, ex)[0]
    res = train_lora(tiny_model_dir, [TrainExample(ex[0].prompt, ex[0].completion, weight)], tmp_path / "run",
                     _cfg(learning_rate=1e-2, batch_size=1, negative_loss=negative_loss), _lora())
    assert res.steps == 1 and res.samples_used == 1
    after = _sample_nll(load_student(tiny_model_dir, res.adapter_dir, device="cpu"), tok, ex)[0]
    if weight < 0:
        assert after > before + 1e-3  # pushed down: the sample's NLL rose
    else:
        assert after < before - 1e-3


def test_the_trainer_uses_the_weights_as_given(tiny_model_dir, tok, tmp_path):
    # One owner for flooring (the weigh step): the weight in the round's version is the weight
    # trained on. A hidden floor at -1 in the trainer made -5.0 and -1.0 train the same.
    runs = {}
    for w in (-5.0, -1.0):
        ex = _examples(tok, [1.0, w, -0.2, 1.0, 1.0])
        res = train_lora(tiny_model_dir, ex, tmp_path / str(w), _cfg(negative_loss="nll"), _lora())
        assert res.samples_skipped_zero_weight == 0 and res.samples_used == 5
        runs[w] = res.loss_curve
    assert runs[-5.0] != runs[-1.0]


# --------------------------------------------------------------------------- LoRA and adapters


def test_lora_leaves_base_weights_untouched_and_changes_the_adapter(tiny_model_dir, tok, tmp_path):
    from safetensors.torch import load_file

    base_file = tiny_model_dir / "model.safetensors"
    base_before = load_file(str(base_file))
    res = train_lora(tiny_model_dir, _examples(tok), tmp_path / "run", _cfg(epochs=2), _lora())
    assert res.steps == 4 and len(res.loss_curve) == 4
    assert all(torch.equal(v, load_file(str(base_file))[k]) for k, v in base_before.items())

    student = load_student(tiny_model_dir, res.adapter_dir, device="cpu")
    # Inside the PEFT model the frozen base weights are those of the file...
    state = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
             for k, v in student.state_dict().items() if "lora_" not in k}
    for k, v in base_before.items():
        assert torch.equal(state[k], v), k
    # ... while the adapter moved off its initialisation (B starts at 0).
    adapter = _adapter_tensors(res.adapter_dir)
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(torch.count_nonzero(v) > 0 for v in lora_b)


def test_saved_and_reloaded_adapter_gives_identical_logits(tiny_model_dir, tok, tmp_path):
    model = _peft_model(tiny_model_dir)
    with torch.no_grad():  # move the adapter away from B = 0 so the check means something
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    model.eval()
    model.save_pretrained(str(tmp_path / "adapter"))
    reloaded = load_student(tiny_model_dir, tmp_path / "adapter", device="cpu")
    ids, mask, _, _ = _batch(tok, _examples(tok))
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask).logits
        b = reloaded(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(a, b)


def test_unknown_target_modules_give_a_clear_error(tiny_model_dir, tok, tmp_path):

    base = load_base(tiny_model_dir, torch.float32, "cpu")
    assert match_target_modules(base, ["q_proj", "nope"]) == ["q_proj"]
    with pytest.raises(ValueError, match="q_proj"):  # the message lists what the model has
        train_lora(tiny_model_dir, _examples(tok), tmp_path / "run", _cfg(), _lora(target_modules=["c_attn"]))


def test_init_adapter_continues_from_the_previous_round(tiny_model_dir, tok, tmp_path):
    first = train_lora(tiny_model_dir, _examples(tok), tmp_path / "r1", _cfg(epochs=2), _lora())
    # No trainable sample: the round's adapter is the previous one, unchanged.
    same = train_lora(tiny_model_dir, _examples(tok, [0.0] * 5), tmp_path / "r2", _cfg(), _lora(),
                      init_adapter=first.adapter_dir)
    a, b = _adapter_tensors(first.adapter_dir), _adapter_tensors(same.adapter_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # With data it trains on from there.
    more = train_lora(tiny_model_dir, _examples(tok), tmp_path / "r3", _cfg(), _lora(),
                      init_adapter=first.adapter_dir)
    c = _adapter_tensors(more.adapter_dir)
    assert any(not torch.equal(a[k], c[k]) for k in a)


# --------------------------------------------------------------------------- data handling


def test_over_long_samples_truncated_and_counted(tiny_model_dir, tok, tmp_path):
    short = TrainExample(_prompt(tok, 1, 2), "3", 1.0)
    long_completion = TrainExample(_prompt(tok, 1, 2), "The answer is 3. " * 20, 1.0)
    long_prompt = TrainExample("Question: " + "1 + 2 + " * 40 + "3?", "6", 1.0)
    max_len = 24
    assert len(tok(long_prompt.prompt)["input_ids"]) > max_len
    enc = encode_examples(tok, [short, long_completion, long_prompt], max_len)
    assert (enc.truncated, enc.skipped_too_long, len(enc.input_ids)) == (1, 1, 2)
    assert max(len(s) for s in enc.input_ids) == max_len
    assert enc.input_ids[0][-1] == tok.eos_token_id  # completion + EOS
    res = train_lora(tiny_model_dir, [short, long_completion, long_prompt], tmp_path / "run",
                     _cfg(max_length=max_len), _lora())
    assert (res.samples_used, res.samples_truncated, res.samples_skipped_too_long) == (2, 1, 1)


def test_parquet_input_equals_list_input(tiny_model_dir, tok, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    ex = _examples(tok, [1.0, -0.5, 0.0, 2.0, 1.0])
    path = tmp_path / "round.parquet"
    pq.write_table(pa.table({"prompt": [e.prompt for e in ex], "completion": [e.completion for e in ex],
                             "weight": [e.weight for e in ex], "extra": list(range(5))}), path)
    a = train_lora(tiny_model_dir, ex, tmp_path / "list", _cfg(), _lora())
    b = train_lora(tiny_model_dir, path, tmp_path / "pq", _cfg(), _lora())
    assert a.loss_curve == b.loss_curve and a.samples_skipped_zero_weight == b.samples_skipped_zero_weight == 1


# --------------------------------------------------------------------------- checkpoints and resume


class _Stop(Exception):
    pass


def test_resume_equals_uninterrupted_training(tiny_model_dir, tok, tmp_path):
    # Dropout on (RNG state must be restored), grad accumulation, mixed-sign weights, cosine warmup.
    ex = _examples(tok, [1.0, -0.5, 2.0, 1.0, -1.0]) + _examples(tok, [0.5, 1.0, 1.0, -0.3, 1.0])
    cfg = _cfg(batch_size=2, grad_accum=2, epochs=2, checkpoint_every=2, schedule="cosine", warmup_ratio=0.2)
    lora = _lora(dropout=0.1)

    full = train_lora(tiny_model_dir, ex, tmp_path / "full", cfg, lora)
    assert full.steps == 5 and full.resumed_from_step is None

    def stop_after_3(step, total):
        assert total == 5
        if step == 3:
            raise _Stop

    out = tmp_path / "interrupted"
    with pytest.raises(_Stop):
        train_lora(tiny_model_dir, ex, out, cfg, lora, progress=stop_after_3)
    ckpts = sorted(p.name for p in (out / CHECKPOINTS_DIR).iterdir())
    assert ckpts == ["step-2"]  # step 3's progress raised before any step-4 checkpoint; no temp dirs left
    manifest = json.loads((out / CHECKPOINTS_DIR / "step-2" / "manifest.json").read_text())
    assert manifest["step"] == 2 and "optimizer.pt" in manifest["files"]
    assert not (out / ADAPTER_DIR).exists() and not (out / METRICS_FILE).exists()

    resumed = train_lora(tiny_model_dir, ex, out, cfg, lora)
    assert resumed.resumed_from_step == 2 and resumed.steps == 5
    assert [s for s, _ in resumed.loss_curve] == [1, 2, 3, 4, 5]
    for (_, a), (_, b) in zip(full.loss_curve, resumed.loss_curve):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6)
    fa, ra = _adapter_tensors(full.adapter_dir), _adapter_tensors(resumed.adapter_dir)
    assert fa.keys() == ra.keys()
    for k in fa:
        torch.testing.assert_close(fa[k], ra[k], rtol=1e-5, atol=1e-6)
    assert not (out / CHECKPOINTS_DIR).exists()  # cleaned up after the final adapter

    # A finished out_dir returns its stored result; different inputs there are refused.
    again = train_lora(tiny_model_dir, ex, out, cfg, lora)
    assert again.to_dict() == resumed.to_dict()
    assert TrainResult.from_dict(json.loads((out / METRICS_FILE).read_text())["result"]) == resumed
    with pytest.raises(ValueError, match="different inputs"):
        train_lora(tiny_model_dir, ex[:-1], out, cfg, lora)


# --------------------------------------------------------------------------- learning happens


def test_tiny_model_learns_to_answer_weighted_correct_samples(tiny_model_dir, tok, tmp_path):
    # Correct answers weight 1; wrong ones get 0 (dropped), as a clipped advantage would give them.
    ex = _examples(tok) + [TrainExample(_prompt(tok, a, b), f"The answer is {a + b + 3}.", 0.0) for a, b in PROBLEMS]
    cfg = _cfg(learning_rate=5e-3, batch_size=5, epochs=60)  # 5/5 for model and LoRA seeds 0-3
    res = train_lora(tiny_model_dir, ex, tmp_path / "run", cfg, LoraConfig(rank=16, alpha=32, dropout=0.0))
    assert res.steps == 60 and res.samples_skipped_zero_weight == len(PROBLEMS)
    assert res.loss_curve[-1][1] < res.loss_curve[0][1] - 1.5
    student = load_student(tiny_model_dir, res.adapter_dir, device="cpu")
    solved = []
    for a, b in PROBLEMS:
        ids = tok(_prompt(tok, a, b), return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            out = student.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
        text = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
        solved.append(str(a + b) in text)
    assert all(solved), solved


def test_bfloat16_path_trains_fp32_adapter(tiny_model_dir, tok, tmp_path):
    # What CUDA runs by default (bf16 base weights, fp32 LoRA, bf16 autocast), exercised on CPU.
    res = train_lora(tiny_model_dir, _examples(tok), tmp_path / "run", _cfg(), _lora(), dtype="bfloat16",
                     device="cpu")
    assert res.extra["dtype"] == "bfloat16" and res.steps == 2
    assert all(torch.isfinite(torch.tensor(v)) for _, v in res.loss_curve)
    adapter = _adapter_tensors(res.adapter_dir)
    assert all(v.dtype == torch.float32 for v in adapter.values())
    assert any(torch.count_nonzero(v) > 0 for k, v in adapter.items() if "lora_B" in k)
    with pytest.raises(ValueError, match="float16"):
        train_lora(tiny_model_dir, _examples(tok), tmp_path / "fp16", _cfg(), _lora(), dtype="float16", device="cpu")


def test_gradient_checkpointing_recomputes_layers_and_trains_the_same(tiny_model_dir, tok, tmp_path, monkeypatch):
    from transformers.models.llama import modeling_llama

    calls = {"n": 0}
    # Count the MLP inside each layer: the layer class's own forward carries the checkpointing
    # wrapper, so it must not be patched.
    real_forward = modeling_llama.LlamaMLP.forward

    def counting_forward(self, *args, **kwargs):
        calls["n"] += 1
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(modeling_llama.LlamaMLP, "forward", counting_forward)
    ex = _examples(tok, [1.0, -0.5, 1.0, 2.0, 1.0])
    plain = train_lora(tiny_model_dir, ex, tmp_path / "plain", _cfg(), _lora())
    plain_calls, calls["n"] = calls["n"], 0
    ckpt = train_lora(tiny_model_dir, ex, tmp_path / "ckpt", _cfg(gradient_checkpointing=True), _lora())
    # Each layer runs again in the backward pass: that is where the memory goes.
    assert calls["n"] == 2 * plain_calls > 0
    assert [s for s, _ in ckpt.loss_curve] == [s for s, _ in plain.loss_curve]
    assert torch.allclose(torch.tensor([v for _, v in ckpt.loss_curve]),
                          torch.tensor([v for _, v in plain.loss_curve]), atol=1e-5)
    a, b = _adapter_tensors(tmp_path / "plain" / "adapter"), _adapter_tensors(tmp_path / "ckpt" / "adapter")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


@pytest.mark.parametrize("weights", [[1.0] * 5, [1.0, 1.0, 1.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0, 1.0]])
def test_max_steps_fixes_the_optimizer_steps_whatever_the_dataset_size(tiny_model_dir, tok, tmp_path, weights):
    # The experiment's equal budget: 6 steps of 2 x 4 samples for 2, 4 or 5 trainable samples (the
    # zero weights are dropped, as group_advantage drops zero-weight groups), where epochs=1 would
    # give 1 step each.
    res = train_lora(tiny_model_dir, _examples(tok, weights), tmp_path / "run", _cfg(max_steps=6, grad_accum=2), _lora())
    assert res.steps == 6 and len(res.loss_curve) == 6
    assert res.samples_used == sum(w != 0 for w in weights)
