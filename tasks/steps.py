"""The steps of a round as plain functions over paths, ids and content hashes.

Each step takes the run config, the round and the small outputs of earlier steps, and returns a
`StepResult`. Steps are resumable by construction:

- model work goes through `ResumableBackend` (teacher and student generations) or `train_lora`'s
  checkpoints, so a finished step does no model work and a half-done one redoes only what is missing;
- intermediate Parquet outputs live in `<workdir>/cache/<step>/<key>/` where the key is the content
  hash of the inputs and the config sections that shape the step (a manifest written last marks
  them complete), so changing a config field invalidates exactly the steps that field shapes;
- catalog writes are idempotent on their keys.

Nothing here imports Prefect: the flows wrap these functions and add retries, tags and artifacts.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from stillhouse.storage import parquet_io
from stillhouse.storage.catalog import Catalog
from stillhouse.tasks.backends.base import Backend, Progress, SampleRequest, derive_seed
from stillhouse.tasks.backends.resumable import ResumableBackend
from stillhouse.tasks.config import ModelConfig, RunConfig
from stillhouse.tasks.problems import Problem

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepResult:
    name: str
    key: str  # content hash of everything that shaped the output
    path: str | None = None  # the output folder, when the step has one
    computed: bool = True  # False: found complete on disk, no work done
    metrics: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- paths and models


def models_dir() -> Path:
    """Where prepared packaged models live; shared across runs (override: STILLHOUSE_MODELS_DIR)."""
    return Path(os.environ.get("STILLHOUSE_MODELS_DIR", Path.home() / ".cache" / "stillhouse" / "models"))


def cache_dir(cfg: RunConfig) -> Path:
    return Path(cfg.workdir) / "cache"


def model_path(model: ModelConfig) -> str:
    from stillhouse.tasks.models.resolve import resolve_model

    return resolve_model(model.name_or_path, models_dir())


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


def resumable(
    cfg: RunConfig, model: ModelConfig, step: str, batch_size: int, adapter: str | None = None,
    adapter_key: str | None = None,
) -> ResumableBackend:
    """The model behind a disk cache; built only if some generation is actually missing."""
    factory = BACKENDS[model.backend]
    model_key = {
        "model": model.model_dump(mode="json", exclude=TRANSPORT_FIELDS),
        "adapter": adapter_key,
    }
    work_dir = Path(cache_dir(cfg)) / "backends" / model.backend
    return ResumableBackend(
        lambda: factory(model, batch_size, adapter, work_dir),
        cache_dir(cfg),
        step=step,
        model_key=model_key,
        shard_size=shard_size(model, batch_size),
    )


def open_catalog(cfg: RunConfig, read_only: bool = False) -> Catalog:
    """The run's catalog: local in the workdir, or where `catalog:` puts it (PostgreSQL, object store)."""
    return Catalog(cfg.workdir, catalog_uri=cfg.catalog.uri, data_path=cfg.catalog.data_path, read_only=read_only)


def _problems(table: pa.Table) -> list[Problem]:
    rows = table.to_pylist()
    return [
        Problem(
            id=r["problem_id"], question=r["question"], answer=r["answer"], source=r["source"],
            split=r["split"], parent_id=r["parent_id"], operation=r["operation"],
            round_introduced=r["round_introduced"], meta=r["meta"],
        )
        for r in rows
    ]


def pool_and_eval(catalog: Catalog, round: int) -> tuple[list[Problem], list[Problem]]:
    """The round's training pool (every train problem introduced so far) and the eval problems."""
    problems = sorted(_problems(catalog.read("problems")), key=lambda p: p.id)
    pool = [p for p in problems if p.split == "train" and p.round_introduced <= round]
    evals = [p for p in problems if p.split == "eval"]
    return pool, evals


# --------------------------------------------------------------------------- 0. seed


def seed_problems(cfg: RunConfig) -> StepResult:
    """Load the configured sources into the catalog (round 0 = FDD's seed problems)."""
    from stillhouse.tasks.sources import load_problems

    loaded = load_problems(list(cfg.problems))
    for s in loaded.skipped[:20]:
        log.warning("skipped %s row %s (%s): %s", s.source, s.row, s.field, s.reason)
    if len(loaded.skipped) > 20:
        log.warning("... and %d more skipped rows", len(loaded.skipped) - 20)
    with open_catalog(cfg) as cat:
        added = cat.add_problems([p.to_row() for p in loaded.problems])
    key = parquet_io.content_hash(sorted(p.id for p in loaded.problems))
    n_eval = sum(p.split == "eval" for p in loaded.problems)
    return StepResult(
        "seed", key, computed=added > 0,
        metrics={"problems": len(loaded.problems), "train": len(loaded.problems) - n_eval,
                 "eval": n_eval, "added": added, "skipped_rows": len(loaded.skipped)},
    )


# --------------------------------------------------------------------------- 1. sample


def sample_teacher(cfg: RunConfig, round: int, progress: Progress | None = None) -> StepResult:
    """The teacher answers every pool problem N times; completions cached as Parquet shards."""
    from stillhouse.tasks.backends.hf import sampling_params
    from stillhouse.tasks.prompts import solve_messages

    with open_catalog(cfg, read_only=True) as cat:
        pool, _ = pool_and_eval(cat, round)
    # The round is part of each seed: a problem that stays in the pool gets fresh samples in
    # every round instead of the same N answers again.
    requests = [
        SampleRequest(p.id, i, solve_messages(p.question, cfg.prompts),
                      derive_seed(cfg.sampling.seed, f"round-{round}/{p.id}", i))
        for p in pool
        for i in range(cfg.sampling.n)
    ]
    params = sampling_params(cfg.sampling)
    backend = resumable(cfg, cfg.teacher, "teacher", cfg.sampling.batch_size)
    try:
        completions = backend.sample(requests, params, progress)
    finally:
        backend.close()
    out = backend.call_dir(requests, params)
    tokens = sum(c.completion_tokens for c in completions)
    return StepResult(
        "sample", out.name, str(out), computed=backend.generated > 0,
        metrics={"pool": len(pool), "samples": len(completions), "generated": backend.generated,
                 "completion_tokens": tokens, "model_seconds": backend.model_seconds},
    )


# --------------------------------------------------------------------------- 2. verify


def verify_samples(cfg: RunConfig, round: int, sampled: StepResult) -> StepResult:
    """Extract and check every final answer against the problem's reference."""
    from stillhouse.tasks.verify.score import score_samples

    key = parquet_io.content_hash({"samples": sampled.key, "verifier": cfg.section_dict("verifier")})
    out = parquet_io.cached_path(cache_dir(cfg), "verify", key[:32])
    if not parquet_io.is_complete(out):
        table = parquet_io.read_output(sampled.path)
        with open_catalog(cfg, read_only=True) as cat:
            pool, _ = pool_and_eval(cat, round)
        answer = {p.id: p.answer for p in pool}
        items = [(t, answer[k]) for t, k in zip(table["text"].to_pylist(), table["key"].to_pylist())]
        v = cfg.verifier
        results = score_samples(items, last_number_fallback=v.last_number_fallback,
                                timeout_s=v.timeout_s, workers=v.workers)
        table = table.append_column("extracted", pa.array([r.extracted for r in results], pa.string()))
        table = table.append_column("correct", pa.array([r.correct for r in results]))
        table = table.append_column("format_ok", pa.array([r.format_ok for r in results]))
        table = table.append_column("error", pa.array([r.error for r in results], pa.string()))
        parquet_io.write_parquet_atomic(table, out / "verified.parquet")
        parquet_io.write_manifest(out, meta={"step": "verify", "round": round})
        computed = True
    else:
        computed = False
    table = parquet_io.read_output(out)
    correct = table["correct"].to_pylist()
    return StepResult(
        "verify", key, str(out), computed,
        metrics={"teacher_accuracy": sum(correct) / len(correct) if correct else 0.0,
                 "format_ok": sum(table["format_ok"].to_pylist()) / max(len(correct), 1),
                 "verifier_errors": sum(e is not None for e in table["error"].to_pylist())},
    )


# --------------------------------------------------------------------------- 3. weigh


def weigh_samples(cfg: RunConfig, round: int, verified: StepResult) -> StepResult:
    """Reward per sample, then its group-relative advantage as the loss weight (AdvDistill)."""
    from stillhouse.tasks.weights import compute_weights, sample_reward

    key = parquet_io.content_hash(
        {"verified": verified.key, **cfg.section_dict("rewards", "weighting")}
    )
    out = parquet_io.cached_path(cache_dir(cfg), "weigh", key[:32])
    if not parquet_io.is_complete(out):
        table = parquet_io.read_output(verified.path)
        correct = table["correct"].to_pylist()
        rewards = [sample_reward(c, f, cfg.rewards) for c, f in zip(correct, table["format_ok"].to_pylist())]
        res = compute_weights(table["key"].to_pylist(), rewards, correct, cfg.weighting)
        table = table.append_column("reward", pa.array(rewards, pa.float64()))
        table = table.append_column("advantage", pa.array(res.advantages, pa.float64()))
        table = table.append_column("weight", pa.array(res.weights, pa.float64()))
        parquet_io.write_parquet_atomic(table, out / "weighted.parquet")
        parquet_io.write_manifest(
            out, meta={"step": "weigh", "groups": res.groups, "degenerate_groups": res.degenerate_groups}
        )
        computed = True
    else:
        computed = False
    table = parquet_io.read_output(out)
    meta = parquet_io.read_manifest(out)["meta"]
    weights = table["weight"].to_pylist()
    return StepResult(
        "weigh", key, str(out), computed,
        metrics={"zero_weight_group_share": meta["degenerate_groups"] / max(meta["groups"], 1),
                 "mean_abs_weight": sum(abs(w) for w in weights) / max(len(weights), 1),
                 "mean_reward": sum(table["reward"].to_pylist()) / max(len(weights), 1)},
    )


# --------------------------------------------------------------------------- 4. version


def sample_id(problem_id: str, round: int, sample_index: int, teacher: str) -> str:
    return parquet_io.content_hash([problem_id, round, sample_index, teacher])[:24]


def commit_version(cfg: RunConfig, round: int, weighted: StepResult, metrics: dict[str, Any]) -> StepResult:
    """Write the round's samples to the catalog and commit them as the round's dataset version."""
    from stillhouse.tasks.prompts import solve_messages

    table = parquet_io.read_output(weighted.path)
    teacher = cfg.teacher.name_or_path
    params = json.dumps(cfg.section_dict("sampling")["sampling"], sort_keys=True)
    with open_catalog(cfg) as cat:
        questions = {p.id: p.question for p in pool_and_eval(cat, round)[0]}
        rows = [
            {
                "sample_id": sample_id(r["key"], round, r["sample_index"], teacher),
                "problem_id": r["key"], "round": round, "sample_index": r["sample_index"],
                "teacher": teacher,
                "prompt": solve_messages(questions[r["key"]], cfg.prompts)[-1]["content"],
                "response": r["text"], "extracted": r["extracted"], "correct": r["correct"],
                "format_ok": r["format_ok"], "reward": r["reward"], "advantage": r["advantage"],
                "weight": r["weight"], "error": r["error"], "sampling_params": params,
                "prompt_tokens": r["prompt_tokens"], "completion_tokens": r["completion_tokens"],
                "finish_reason": r["finish_reason"],
            }
            for r in table.to_pylist()
        ]
        if any(r.round == round and r.status == "committed" for r in cat.status().rounds):
            snapshot = cat.commit_round(round, metrics, config_hash=weighted.key)
            return StepResult("version", weighted.key, None, False, {"snapshot": snapshot, "added": 0})
        added = cat.add_samples(rows)
        snapshot = cat.commit_round(round, metrics, config_hash=weighted.key)
    return StepResult("version", weighted.key, None, True, {"snapshot": snapshot, "added": added})


# --------------------------------------------------------------------------- 5. train


def adapter_dir(cfg: RunConfig, round: int, key: str) -> Path:
    return Path(cfg.workdir) / "adapters" / f"round-{round}" / key[:16]


def train_student(
    cfg: RunConfig, round: int, version: StepResult, previous: StepResult | None,
    progress: Progress | None = None,
) -> StepResult:
    """LoRA fine-tune the student on the round's version with the weighted loss."""
    from stillhouse.tasks.models.resolve import load_tokenizer
    from stillhouse.tasks.prompts import has_chat_template, render_prompt, solve_messages
    from stillhouse.tasks.training.data import TrainExample
    from stillhouse.tasks.training.trainer import finished_result, train_lora

    init = previous.path if (previous is not None and cfg.training.init == "previous") else None
    key = parquet_io.content_hash(
        {"version": version.key, "init": previous.key if init else None,
         **cfg.section_dict("student", "training", "prompts")}
    )
    out = adapter_dir(cfg, round, key)
    base = model_path(cfg.student.model)
    result = finished_result(out)
    computed = result is None
    t0 = time.perf_counter()
    if computed:
        with open_catalog(cfg, read_only=True) as cat:
            table = cat.training_set(round)
        tok = load_tokenizer(base, revision=cfg.student.model.revision)
        templated = has_chat_template(tok, cfg.student.model.chat_template)
        prompts: dict[str, str] = {}
        examples = []
        for r in table.select(["problem_id", "question", "response", "weight"]).to_pylist():
            if r["problem_id"] not in prompts:
                messages = solve_messages(r["question"], cfg.prompts)
                prompts[r["problem_id"]] = render_prompt(tok, messages, cfg.student.model.chat_template)
            examples.append(TrainExample(prompts[r["problem_id"]], r["response"], r["weight"]))
        # Encode prompts exactly as the sampling backend does: special tokens only for plain text.
        result = train_lora(
            base, examples, out, cfg.training, cfg.student.lora, init_adapter=init, progress=progress,
            dtype=cfg.student.model.dtype, device=cfg.student.model.device,
            prompt_special_tokens=not templated,
        )
    model_seconds = time.perf_counter() - t0 if computed else 0.0
    losses = [v for _, v in result.loss_curve]
    return StepResult(
        "train", key, str(result.adapter_dir), computed,
        metrics={"train_loss": losses[-1] if losses else None,
                 "train_loss_first": losses[0] if losses else None,
                 "tokens_per_s": result.tokens_per_s, "steps": result.steps,
                 "samples_used": result.samples_used,
                 "samples_zero_weight": result.samples_skipped_zero_weight,
                 "samples_truncated": result.samples_truncated,
                 "train_seconds": result.train_seconds, "model_seconds": model_seconds},
    )


# --------------------------------------------------------------------------- 6. evaluate


def evaluate(cfg: RunConfig, round: int, trained: StepResult, progress: Progress | None = None) -> StepResult:
    """Student (base + this round's adapter): greedy accuracy per eval set, pass rate on the pool."""
    from stillhouse.tasks.evaluation import evaluate_student

    with open_catalog(cfg, read_only=True) as cat:
        pool, evals = pool_and_eval(cat, round)
    key = parquet_io.content_hash(
        {"adapter": trained.key, "pool": [p.id for p in pool], "eval": [p.id for p in evals],
         **cfg.section_dict("evaluation", "verifier", "prompts")}
    )
    out = parquet_io.cached_path(cache_dir(cfg), "evaluate", key[:32])
    computed = not parquet_io.is_complete(out)
    model_seconds = 0.0
    if computed:
        backend = resumable(cfg, cfg.student.model, "student", cfg.evaluation.batch_size,
                            adapter=trained.path, adapter_key=trained.key)
        try:
            res = evaluate_student(backend, evals, pool, cfg.evaluation, cfg.prompts,
                                   verifier=cfg.verifier, seed=cfg.sampling.seed, progress=progress)
        finally:
            backend.close()
        model_seconds = backend.model_seconds
        rows = [{"round": round, "student_key": key[:32], **{k: r[k] for k in (
            "eval_set", "problem_id", "sample_index", "response", "extracted", "correct")}}
            for r in res.rows]
        parquet_io.write_parquet_atomic(pa.Table.from_pylist(rows), out / "eval.parquet")
        parquet_io.write_manifest(out, meta={"summary": res.summary(), "pass_rates": res.pass_rates})
    table = parquet_io.read_output(out)
    meta = parquet_io.read_manifest(out)["meta"]
    with open_catalog(cfg) as cat:
        cat.add_eval_results(table)
    summary = meta["summary"]
    return StepResult(
        "evaluate", key, str(out), computed,
        metrics={"student_accuracy": summary["accuracy"], "student_overall": summary["overall_accuracy"],
                 "pool_mean_pass_rate": summary["pool_mean_pass_rate"], "model_seconds": model_seconds},
    )


# --------------------------------------------------------------------------- 7. split


def split_pool(cfg: RunConfig, round: int, evaluated: StepResult) -> StepResult:
    """Pool problems -> easy (the student solves them) / hard (it does not) / mid (FDD)."""
    from stillhouse.tasks.split import split_by_pass_rate

    meta = parquet_io.read_manifest(evaluated.path)["meta"]
    res = split_by_pass_rate(meta["pass_rates"], cfg.split.easy_threshold, cfg.split.hard_threshold)
    key = parquet_io.content_hash({"evaluated": evaluated.key, **cfg.section_dict("split")})
    rows = [
        {"round": round, "student_key": evaluated.key[:32], "problem_id": pid,
         "pass_rate": float(meta["pass_rates"][pid]), "label": label}
        for pid, label in sorted(res.labels.items())
    ]
    with open_catalog(cfg) as cat:
        added = cat.add_split_labels(rows)
    return StepResult(
        "split", key, None, added > 0,
        metrics={"easy": res.counts["easy"], "hard": res.counts["hard"], "mid": res.counts["mid"],
                 "labels": {r["problem_id"]: r["label"] for r in rows}},
    )


# --------------------------------------------------------------------------- 8. synthesize


def synthesize_problems(cfg: RunConfig, round: int, split: StepResult,
                        progress: Progress | None = None) -> StepResult:
    """The teacher writes harder variants of easy problems and similar ones for hard problems;
    survivors (parsed, deduplicated, uncontaminated, majority-answered) join round r+1's pool."""
    from stillhouse.tasks.synthesis.synthesize import synthesize

    labels = split.metrics["labels"]
    with open_catalog(cfg, read_only=True) as cat:
        pool, evals = pool_and_eval(cat, round)
    easy = [p for p in pool if labels.get(p.id) == "easy"]
    hard = [p for p in pool if labels.get(p.id) == "hard"]
    key = parquet_io.content_hash(
        {"split": split.key, "easy": [p.id for p in easy], "hard": [p.id for p in hard],
         **cfg.section_dict("synthesis", "prompts", "sampling", "verifier", "teacher")}
    )
    out = parquet_io.cached_path(cache_dir(cfg), "synthesize", key[:32])
    computed = not parquet_io.is_complete(out)
    model_seconds = 0.0
    if computed:
        backend = resumable(cfg, cfg.teacher, "teacher", cfg.sampling.batch_size)
        try:
            res = synthesize(backend, easy, hard, pool, evals, round, cfg.synthesis, cfg.prompts,
                             cfg.sampling, verifier=cfg.verifier, progress=progress)
        finally:
            backend.close()
        model_seconds = backend.model_seconds
        out.mkdir(parents=True, exist_ok=True)
        table = pa.Table.from_pylist([p.to_row() for p in res.problems]) if res.problems else None
        if table is not None:
            parquet_io.write_parquet_atomic(table, out / "problems.parquet")
        parquet_io.write_manifest(out, meta={"counts": res.counts})
    meta = parquet_io.read_manifest(out)["meta"]
    new_rows = parquet_io.read_output(out).to_pylist() if meta["counts"]["kept"] else []
    with open_catalog(cfg) as cat:
        added = cat.add_problems(new_rows) if new_rows else 0
    counts = meta["counts"]
    return StepResult(
        "synthesize", key, str(out), computed,
        metrics={"synth_generated": counts["generated"], "synth_kept": counts["kept"],
                 "synth_dropped": counts["dropped"], "synth_added": added,
                 "model_seconds": model_seconds},
    )
