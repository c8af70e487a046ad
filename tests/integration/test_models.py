"""Model preparation: the tiny test model, the packaged SmolLM2, name resolution and loading."""

from __future__ import annotations

import json
import time

import pytest

from stillhouse.tasks.models.prepared import SMOLLM2_NAME, prepare_model

from stillhouse.tasks.models.publish import MANIFEST

from stillhouse.tasks.models.resolve import load_model_and_tokenizer, load_tokenizer, resolve_model

from stillhouse.tasks.models.tiny import TINY_NAME, build_tiny_model

pytestmark = pytest.mark.integration


def _chat_ids(tok, text):
    prompt = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    return tok([prompt], return_tensors="pt", add_special_tokens=False)


def test_tiny_model_folder_is_complete(tiny_model_dir):
    names = {p.name for p in tiny_model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", MANIFEST} <= names
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 2
    assert config["head_dim"] == 64 and config["hidden_size"] // config["num_attention_heads"] == 64
    assert json.loads((tiny_model_dir / MANIFEST).read_text())["name"] == TINY_NAME


def test_tiny_model_reloads_and_generates(tiny_model_dir):
    import torch

    model, tok = load_model_and_tokenizer(tiny_model_dir)
    assert model.dtype == torch.float32 and str(model.device) == "cpu"
    assert tok.padding_side == "left"
    assert tok.bos_token == "<s>" and tok.eos_token == "<|im_end|>" and tok.pad_token == "<pad>"
    assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}) == 3
    enc = _chat_ids(tok, "Ann has 3 apples. How many?")
    assert tok.decode(enc.input_ids[0]).startswith("<|im_start|>user\nAnn has 3 apples.")
    out = model.generate(**enc, max_new_tokens=5, do_sample=False)
    assert out.shape == (1, enc.input_ids.shape[1] + 5) or tok.eos_token_id in out[0].tolist()
    # Round trip of the math formats the verifier reads.
    text = "The answer is \\boxed{1,234}.\n#### 1234"
    assert tok.decode(tok(text, add_special_tokens=False).input_ids) == text


def test_load_tokenizer_padding_side(tiny_model_dir):
    assert load_tokenizer(tiny_model_dir).padding_side == "left"
    assert load_tokenizer(tiny_model_dir, for_generation=False).padding_side == "right"


def test_tiny_chat_template_marks_assistant_tokens(tiny_model_dir):
    _, tok = load_model_and_tokenizer(tiny_model_dir)
    out = tok.apply_chat_template(
        [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "#### 4"}],
        tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
    )
    marked = [t for t, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    assert tok.decode(marked) == "#### 4<|im_end|>"


def test_tiny_model_is_deterministic_and_idempotent(tmp_path, tiny_model_dir):
    again = build_tiny_model(tmp_path / "a", seed=0)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (again / name).read_bytes() == (tiny_model_dir / name).read_bytes(), name
    other = build_tiny_model(tmp_path / "b", seed=1)
    assert (other / "model.safetensors").read_bytes() != (again / "model.safetensors").read_bytes()
    stamp = (again / "model.safetensors").stat().st_mtime_ns
    assert build_tiny_model(again, seed=0) == again  # manifest matches: nothing rebuilt
    assert (again / "model.safetensors").stat().st_mtime_ns == stamp
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_tiny_rejects_head_dim_other_than_64(tmp_path):
    with pytest.raises(ValueError, match="head_dim"):
        build_tiny_model(tmp_path / "x", hidden_size=64, num_heads=2)


def test_resolve_model(tmp_path, tiny_model_dir):
    assert resolve_model("Qwen/Qwen2.5-7B-Instruct", tmp_path) == "Qwen/Qwen2.5-7B-Instruct"
    assert resolve_model(str(tiny_model_dir), tmp_path) == str(tiny_model_dir)
    built = resolve_model(TINY_NAME, tmp_path)
    assert built == str(tmp_path / TINY_NAME) and (tmp_path / TINY_NAME / MANIFEST).is_file()
    with pytest.raises(FileNotFoundError):
        resolve_model(str(tmp_path / "missing"), tmp_path)
    with pytest.MonkeyPatch.context() as mp:  # no models_dir: $STILLHOUSE_MODELS_DIR
        mp.setenv("STILLHOUSE_MODELS_DIR", str(tmp_path / "env"))
        assert resolve_model(TINY_NAME) == str(tmp_path / "env" / TINY_NAME)
    with pytest.raises(ValueError, match="unknown prepared model"):
        prepare_model("gpt-17", tmp_path / "x")


@pytest.mark.requires_smollm2
def test_smollm2_prepared_folder_loads_and_answers(smollm2_dir):
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["head_dim"] == 64
    assert json.loads((smollm2_dir / MANIFEST).read_text())["name"] == SMOLLM2_NAME
    assert (smollm2_dir / "chat_template.jinja").is_file() or "chat_template" in (
        smollm2_dir / "tokenizer_config.json"
    ).read_text()

    t0 = time.perf_counter()
    assert prepare_model(SMOLLM2_NAME, smollm2_dir) == smollm2_dir  # idempotent, no rebuild
    assert time.perf_counter() - t0 < 1.0

    model, tok = load_model_and_tokenizer(smollm2_dir)
    assert tok.eos_token == "<|im_end|>" and tok.padding_side == "left"
    enc = _chat_ids(tok, "What is the capital of France? Answer in one word.")
    out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, enc.input_ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer
