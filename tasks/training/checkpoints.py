"""Training checkpoints and the final adapter, written atomically (temp folder, manifest last,
storage.parquet_io.publish_dir), and the fingerprint that decides whether a folder may be resumed."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stillhouse.storage.parquet_io import write_json_atomic
from stillhouse.tasks.config import LoraConfig, TrainingConfig
from stillhouse.storage.parquet_io import publish_dir
from stillhouse.tasks.training.data import TrainExample

ADAPTER_DIR = "adapter"
CHECKPOINTS_DIR = "checkpoints"
MANIFEST_FILE = "manifest.json"
_FORMAT_VERSION = 1
_KEEP_CHECKPOINTS = 2


# --------------------------------------------------------------------------- checkpoints


def inputs_fingerprint(base_model_path, examples: Sequence[TrainExample], cfg: TrainingConfig, lora: LoraConfig,
                 init_adapter, negative: str, prompt_special_tokens: bool | None) -> str:
    h = hashlib.sha256()
    head = {
        "v": _FORMAT_VERSION,
        "base": str(base_model_path),
        "cfg": cfg.model_dump(mode="json"),
        "lora": lora.model_dump(mode="json"),
        "init_adapter": str(init_adapter) if init_adapter else None,
        "negative": negative,
        "prompt_special_tokens": prompt_special_tokens,
        "n": len(examples),
    }
    h.update(json.dumps(head, sort_keys=True).encode())
    for ex in examples:
        h.update(json.dumps([ex.prompt, ex.completion, float(ex.weight)]).encode())
    return h.hexdigest()


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    found = []
    if root.is_dir():
        for d in root.iterdir():
            if d.is_dir() and d.name.startswith("step-") and (d / MANIFEST_FILE).is_file():
                try:
                    found.append((int(d.name[5:]), d))
                except ValueError:
                    continue
    return sorted(found)


def _rng_state() -> dict[str, Any]:
    import torch

    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(root: Path, step: int, model, optimizer, scheduler, state: dict[str, Any]) -> Path:
    import torch

    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-step-{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    model.save_pretrained(str(tmp / ADAPTER_DIR))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(_rng_state(), tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps(state, sort_keys=True))
    # Manifest last: a folder without it is incomplete and ignored on resume.
    write_json_atomic({
        "format": _FORMAT_VERSION, "step": step, "fingerprint": state["fingerprint"],
        "files": sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file()),
    }, tmp / MANIFEST_FILE)
    final = publish_dir(tmp, root / f"step-{step}")
    for _, old in complete_checkpoints(root)[:-_KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(ckpt: Path, model, optimizer, scheduler) -> dict[str, Any]:
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    adapter_file = ckpt / ADAPTER_DIR / "adapter_model.safetensors"
    weights = load_file(str(adapter_file))
    result = set_peft_model_state_dict(model, weights)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise RuntimeError(f"checkpoint {ckpt} does not fit the model: unexpected keys {unexpected[:5]}")
    optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))
    _set_rng_state(torch.load(ckpt / "rng.pt", weights_only=False))
    return json.loads((ckpt / "state.json").read_text())


def save_adapter(model, out_dir: Path) -> Path:
    final = out_dir / ADAPTER_DIR
    tmp = out_dir / f".tmp-{ADAPTER_DIR}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    return publish_dir(tmp, final)


