"""Open the configured model as a sampling backend: which implementation a name selects, how it is
built from the config, and the run's disk cache around it (ResumableBackend).

The step functions (tasks/steps.py) only say which model and what for:

    with open_backend(cfg.teacher, cache_dir(cfg), step="teacher", batch_size=16) as teacher:
        completions = teacher.sample(requests, params)
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from stillhouse.tasks.backends.base import Backend
from stillhouse.tasks.backends.dispatch import SHARDING, Sharding, sharding
from stillhouse.tasks.backends.resumable import ResumableBackend
from stillhouse.tasks.config import ModelConfig


def model_path(model: ModelConfig) -> str:
    """The configured model as `from_pretrained` loads it (prepared names built on first use)."""
    from stillhouse.tasks.models.resolve import resolve_model

    return resolve_model(model.name_or_path)


def _hf_backend(model: ModelConfig, batch_size: int, adapter: str | None, work_dir: Path) -> Backend:
    from stillhouse.tasks.backends.hf import HFBackend

    return HFBackend(
        model_path(model),
        dtype=model.dtype,
        device=model.device,
        batch_size=batch_size,
        chat_template=model.chat_template,
        revision=model.revision,
        adapter_path=adapter,
    )


def _openai_backend(model: ModelConfig, batch_size: int, adapter: str | None, work_dir: Path) -> Backend:
    from stillhouse.tasks.backends.openai import OpenAIBackend

    if adapter is not None:
        # A served model cannot take a local LoRA folder; the server has to load it itself.
        raise ValueError(
            "backend openai cannot apply a local LoRA adapter; serve it (vllm serve --lora-modules) "
            "or use backend hf/vllm for the student"
        )
    if not model.base_url:
        raise ValueError(f"backend openai needs base_url for model {model.name_or_path!r}")
    # The journal lives in the run's cache: responses received before a crash are reused by the
    # rerun and travel with the workdir.
    return OpenAIBackend.from_config(model, journal_dir=work_dir / "journal")


def _vllm_backend(model: ModelConfig, batch_size: int, adapter: str | None, work_dir: Path) -> Backend:
    from stillhouse.tasks.backends.vllm import VLLMBackend

    # batch_size is the hf backend's knob: vLLM schedules its own batches. The call's requests
    # arrive in ResumableBackend shards (see shard_size), each one generate pass over the engines.
    return VLLMBackend(
        model_path(model),
        work_dir=work_dir,
        vllm_python=model.vllm_python,
        python_field="student.model.vllm_python" if adapter else "teacher.vllm_python",
        dtype=model.dtype,
        chat_template=model.chat_template,
        revision=model.revision,
        adapter_path=adapter,
        tensor_parallel_size=model.tensor_parallel_size,
        data_parallel_size=model.data_parallel_size,
        gpu_memory_utilization=model.gpu_memory_utilization,
        max_model_len=model.max_model_len,
        enable_prefix_caching=model.enable_prefix_caching,
        engine_args=model.vllm_engine_args,
        # ResumableBackend keeps the results in the run's cache; the engines' shard files are only
        # needed until a call has returned (a killed call's finished shards stay for the rerun).
        cleanup=True,
    )


# A name selects the function that builds a backend; vllm and openai plug in here.
# Each gets (model, batch size, adapter folder or None, a work folder inside the run's cache).
BACKENDS: dict[str, Callable[[ModelConfig, int, str | None, Path], Backend]] = {
    "hf": _hf_backend,
    "vllm": _vllm_backend,
    "openai": _openai_backend,
}


# How requests travel or where they run, not what they produce: changing these never invalidates
# cached generations (vLLM's data-parallel engines each get whole requests with their own seeds).
TRANSPORT_FIELDS = {
    "max_concurrency", "request_timeout_s", "max_retries", "retry_backoff_s", "api_key_env",
    "vllm_python", "data_parallel_size", "gpu_memory_utilization",
}


def shard_size(model: ModelConfig, batch_size: int) -> int:
    """Requests per cached shard: the unit of resumption, and one backend call.

    hf generates batch_size at a time, so a few batches per shard. vLLM and servers schedule their
    own batches and want many requests per call to keep GPUs busy; a shard is still small enough
    that a crash loses little.
    """
    base = max(batch_size, 1) * 4
    if model.backend == "vllm":
        return max(base, 1024)
    if model.backend == "openai":
        return max(base, model.max_concurrency * 4)
    return base


def open_backend(
    model: ModelConfig, cache_dir: str | Path, *, step: str, batch_size: int, adapter: str | None = None,
    adapter_key: str | None = None,
) -> ResumableBackend:
    """The model behind the run's disk cache; built only if some generation is actually missing.

    Use it like a file: `with open_backend(cfg.teacher, cache, step="teacher", batch_size=16) as
    teacher: teacher.sample(...)` closes the model (and a vLLM engine's processes) on the way out.
    """
    factory = BACKENDS[model.backend]
    model_key = {
        "model": model.model_dump(mode="json", exclude=TRANSPORT_FIELDS),
        "adapter": adapter_key,
    }
    work_dir = Path(cache_dir) / "backends" / model.backend
    sharding = SHARDING.get()
    size = (sharding.shard_size if sharding is not None else None) or shard_size(model, batch_size)
    # Everything needed to open this same backend in another process (a shard on a worker):
    # absolute paths, as the worker's working directory is not ours.
    spec = {"model": model.model_dump(mode="json"), "cache_dir": str(Path(cache_dir).resolve()), "step": step,
            "batch_size": batch_size, "shard_size": size,
            "adapter": str(Path(adapter).resolve()) if adapter else None, "adapter_key": adapter_key}
    return ResumableBackend(
        lambda: factory(model, batch_size, adapter, work_dir),
        cache_dir,
        step=step,
        model_key=model_key,
        shard_size=size,
        spec=spec,
    )


def reopen_backend(spec: dict) -> ResumableBackend:
    """The backend `open_backend` described in `spec` (ResumableBackend.spec), in this process."""
    model = ModelConfig.model_validate(spec["model"])
    # The spec's shard size, not the backend default: the call's key and cut depend on it.
    with sharding(Sharding(shard_size=spec["shard_size"])):
        return open_backend(model, spec["cache_dir"], step=spec["step"], batch_size=spec["batch_size"],
                            adapter=spec["adapter"], adapter_key=spec["adapter_key"])
