"""The steps of a round as plain functions over paths, ids and content hashes.

Each step takes the run config, the round and the small outputs of earlier steps, and returns a
`StepResult`: where its output is and the step's metrics (metrics only: data travels through files
and the catalog). Steps are resumable by construction:

- model work goes through `open_backend` (a `ResumableBackend`: teacher and student generations
  cached as Parquet shards) or `train_lora`'s checkpoints, so a finished step does no model work and
  a half-done one redoes only what is missing;
- intermediate Parquet outputs live in `<workdir>/cache/<step>/<key>/` where the key is the content
  hash of the inputs and the config sections that shape the step (`parquet_io.cached_output`: a
  manifest written last marks them complete), so changing a config field invalidates exactly the
  steps that field shapes;
- catalog writes are idempotent on their keys.

Nothing here imports Prefect: the flows wrap these functions and add retries, tags and artifacts.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from stillhouse.storage import parquet_io
from stillhouse.storage.catalog import Catalog, RoundCommittedError
from stillhouse.tasks.backends.base import Progress, SamplingParams
from stillhouse.tasks.backends.open import TRANSPORT_FIELDS, model_path, open_backend
from stillhouse.tasks.config import RunConfig
from stillhouse.tasks.ledger import check_budget
from stillhouse.tasks.problems import Problem, SourceError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepResult:
    name: str
    key: str  # content hash of everything that shaped the output
    path: str | None = None  # the output folder, when the step has one
    computed: bool = True  # False: found complete on disk, no work done
    metrics: dict[str, Any] = field(default_factory=dict)  # numbers for the round's record only


# --------------------------------------------------------------------------- run folders and catalog


def cache_dir(cfg: RunConfig) -> Path:
    return Path(cfg.cache_dir) if cfg.cache_dir else Path(cfg.workdir) / "cache"


# A reader beside the run (`stillhouse status`, ...) holds the catalog file for the milliseconds of
# a snapshot copy: the run's steps wait that out, with backoff, instead of failing.
CATALOG_LOCK_WAIT_S = 60.0


def open_catalog(cfg: RunConfig, read_only: bool = False) -> Catalog:
    """The run's catalog: local in the workdir, or where `catalog:` puts it (PostgreSQL, object store)."""
    return Catalog(cfg.workdir, catalog_uri=cfg.catalog.uri, data_path=cfg.catalog.data_path, read_only=read_only,
                   lock_wait_s=CATALOG_LOCK_WAIT_S)


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
    """The round's training pool (every train problem introduced so far) and the eval problems,
    without quarantined problems (see quarantine_unfit)."""
    quarantined = catalog.quarantined()
    problems = sorted(_problems(catalog.read("problems")), key=lambda p: p.id)
    problems = [p for p in problems if p.id not in quarantined]
    pool = [p for p in problems if p.split == "train" and p.round_introduced <= round]
    evals = [p for p in problems if p.split == "eval"]
    return pool, evals


def quarantine_unfit(cfg: RunConfig, round: int) -> dict[str, str]:
    """Quarantine the problems whose prompt does not fit the teacher's context (pool) or the
    student's (pool and eval sets), before any model work; returns {problem id: reason} of the
    newly quarantined. They are recorded in the catalog's `quarantine` table and logged, and every
    step's pool leaves them out, so one poisoned row (e.g. a 1 MB question already in the catalog)
    costs itself instead of crashing every resume."""
    from stillhouse.tasks.admission import hf_budget, unfit_problems
    from stillhouse.tasks.prompts import solve_messages

    with open_catalog(cfg, read_only=True) as cat:
        pool, evals = pool_and_eval(cat, round)
    if not pool and not evals:
        return {}

    def messages(p: Problem):
        return solve_messages(p.question, cfg.prompts)

    def budget(who: str, model: Any, new_tokens: int):
        # A served model (openai) has no local config or tokenizer: its context is not checked.
        return None if model.backend == "openai" else hf_budget(who, model, model_path(model), new_tokens, messages)

    teacher = budget("teacher", cfg.teacher, cfg.sampling.max_new_tokens)
    student = budget("student", cfg.student.model, cfg.evaluation.max_new_tokens)
    unfit = unfit_problems(pool, [teacher] if teacher else [])
    unfit.update(unfit_problems([p for p in pool + evals if p.id not in unfit], [student] if student else []))
    if unfit:
        rows = [{"problem_id": pid, "round": round, "reason": "prompt_too_long", "detail": why}
                for pid, why in sorted(unfit.items())]
        with open_catalog(cfg) as cat:
            cat.add_quarantine(rows)
        for r in rows[:20]:
            log.warning("quarantined problem %s (round %d): %s", r["problem_id"], round, r["detail"])
        if len(rows) > 20:
            log.warning("... and %d more quarantined problems", len(rows) - 20)
    return unfit


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
    quarantined = quarantine_unfit(cfg, 0)
    with open_catalog(cfg, read_only=True) as cat:
        pool, _ = pool_and_eval(cat, 0)
    if not pool:
        # Fail here, in seconds, naming the sources: an empty pool would only fail later, at
        # sampling, with an error about a cache folder.
        held = f"; {len(quarantined)} quarantined (prompt too long)" if quarantined else ""
        raise SourceError(f"0 training problems: {_sources_summary(cfg, loaded)}{held}; nothing to distill")
    key = parquet_io.content_hash(sorted(p.id for p in loaded.problems))
    n_eval = len(loaded.of_split("eval"))
    return StepResult(
        "seed", key, computed=added > 0,
        metrics={"problems": len(loaded.problems), "train": len(loaded.problems) - n_eval,
                 "eval": n_eval, "added": added, "skipped_rows": len(loaded.skipped),
                 "quarantined": len(quarantined)},
    )


def check_sources(cfg: RunConfig) -> str:
    """Load the configured sources once before a run starts (no Prefect, no models): a source that
    cannot be read, or sources that give no training problem for a new run, fail here in seconds
    with the sources named. Returns the per-source summary. A workdir that already has a catalog
    is left to the seed step, which also counts the pool already there."""
    from stillhouse.tasks.sources import load_problems

    loaded = load_problems(list(cfg.problems))
    summary = _sources_summary(cfg, loaded)
    has_catalog = cfg.catalog.uri is not None or (Path(cfg.workdir) / "catalog").exists()
    if not has_catalog and not any(p.split == "train" for p in loaded.problems):
        raise SourceError(f"0 training problems: {summary}; nothing to distill")
    return summary


def _sources_summary(cfg: RunConfig, loaded: Any) -> str:
    """Per source: where it is, its train/eval problems, its skipped rows and the first reason."""
    from stillhouse.tasks.sources import source_location, source_name

    parts = []
    for src in cfg.problems:
        name = source_name(src)
        got = [p for p in loaded.problems if p.source == name]
        skipped = [s for s in loaded.skipped if s.source == name]
        part = (f"source {name!r} ({source_location(src)}): {sum(p.split == 'train' for p in got)} train / "
                f"{sum(p.split == 'eval' for p in got)} eval problems, {len(skipped)} rows skipped")
        if skipped:
            first = skipped[0]
            part += f" (first: row {first.row} {first.field or 'row'}: {first.reason})"
        parts.append(part)
    return "; ".join(parts)


# --------------------------------------------------------------------------- 1. sample


def sample_teacher(cfg: RunConfig, round: int, progress: Progress | None = None) -> StepResult:
    """The teacher answers every pool problem N times; completions cached as Parquet shards."""
    from stillhouse.tasks.prompts import solve_requests

    quarantine_unfit(cfg, round)  # problems synthesized since the seed step, before any sampling
    with open_catalog(cfg, read_only=True) as cat:
        pool, _ = pool_and_eval(cat, round)
    # The round is part of each seed: a problem that stays in the pool gets fresh samples in
    # every round instead of the same N answers again.
    requests = solve_requests(pool, cfg.sampling.n, cfg.sampling.seed, cfg.prompts, seed_scope=f"round-{round}/")
    params = SamplingParams.from_config(cfg.sampling)
    with open_backend(cfg.teacher, cache_dir(cfg), step="teacher", batch_size=cfg.sampling.batch_size) as teacher:
        # Only what is still to generate counts against the budget: a resumed round's finished
        # shards are paid for already.
        check_budget(cfg, f"round {round}'s teacher sampling", teacher.pending(requests, params))
        completions = teacher.sample(requests, params, progress)
    out = teacher.call_dir(requests, params)
    return StepResult(
        "sample", out.name, str(out), computed=teacher.generated > 0,
        metrics={"pool": len(pool), "samples": len(completions), "generated": teacher.generated,
                 "teacher_call": out.name, "requests": len(requests),
                 "prompt_tokens": teacher.prompt_tokens, "completion_tokens": teacher.completion_tokens,
                 "model_seconds": teacher.model_seconds},
    )


# --------------------------------------------------------------------------- 2. verify


def verify_samples(cfg: RunConfig, round: int, sampled: StepResult) -> StepResult:
    """Extract and check every final answer against the problem's reference (pot: run the
    program in the sandbox and check what it prints)."""
    from stillhouse.tasks.verify.programs import score_responses

    def compute(out: Path) -> dict[str, Any]:
        table = parquet_io.read_output(sampled.path)
        with open_catalog(cfg, read_only=True) as cat:
            pool, _ = pool_and_eval(cat, round)
        answer = {p.id: p.answer for p in pool}
        items = [(t, answer[k]) for t, k in zip(table["text"].to_pylist(), table["key"].to_pylist())]
        v = cfg.verifier
        results = score_responses(items, v)
        table = table.append_column("extracted", pa.array([r.extracted for r in results], pa.string()))
        table = table.append_column("correct", pa.array([r.correct for r in results]))
        table = table.append_column("format_ok", pa.array([r.format_ok for r in results]))
        table = table.append_column("error", pa.array([r.error for r in results], pa.string()))
        parquet_io.write_parquet_atomic(table, out / "verified.parquet")
        return {"step": "verify", "round": round}

    key = parquet_io.content_hash({"samples": sampled.key, "verifier": cfg.section_dict("verifier")})
    out, computed = parquet_io.cached_output(cache_dir(cfg), "verify", key, compute)
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

    def compute(out: Path) -> dict[str, Any]:
        table = parquet_io.read_output(verified.path)
        correct = table["correct"].to_pylist()
        rewards = [sample_reward(c, f, cfg.rewards) for c, f in zip(correct, table["format_ok"].to_pylist())]
        res = compute_weights(table["key"].to_pylist(), rewards, correct, cfg.weighting)
        table = table.append_column("reward", pa.array(rewards, pa.float64()))
        table = table.append_column("advantage", pa.array(res.advantages, pa.float64()))
        table = table.append_column("weight", pa.array(res.weights, pa.float64()))
        parquet_io.write_parquet_atomic(table, out / "weighted.parquet")
        return {"step": "weigh", "groups": res.groups, "degenerate_groups": res.degenerate_groups}

    key = parquet_io.content_hash({"verified": verified.key, **cfg.section_dict("rewards", "weighting")})
    out, computed = parquet_io.cached_output(cache_dir(cfg), "weigh", key, compute)
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
        # The settings that shape the dataset go into the commit's record, so that a later change
        # can be named field by field instead of by two content hashes.
        metrics = {**metrics, "dataset_inputs": dataset_inputs(cfg)}
        committed = cat.round_metrics(round)
        if committed is not None:
            if cat.committed_config_hash(round) != weighted.key:
                raise RoundCommittedError(_changed_message(cfg, round, committed, cat.round_snapshot(round)))
            snapshot = cat.commit_round(round, metrics, config_hash=weighted.key)
            return StepResult("version", weighted.key, None, False, {"snapshot": snapshot, "added": 0})
        added = cat.add_samples(rows)
        snapshot = cat.commit_round(round, metrics, config_hash=weighted.key)
    return StepResult("version", weighted.key, None, True, {"snapshot": snapshot, "added": added})


DATASET_SECTIONS = ("problems", "teacher", "sampling", "prompts", "verifier", "rewards", "weighting")


def dataset_inputs(cfg: RunConfig) -> dict[str, Any]:
    """The config fields that shape a round's dataset, flat ("rewards.format" -> value)."""
    def flat(prefix: str, value: Any, out: dict[str, Any]) -> dict[str, Any]:
        if isinstance(value, dict):
            for k, v in value.items():
                flat(f"{prefix}.{k}" if prefix else str(k), v, out)
        else:
            out[prefix] = value
        return out

    return flat("", cfg.section_dict(*DATASET_SECTIONS), {})


def _changed_message(cfg: RunConfig, round: int, committed: dict[str, Any], snapshot: int) -> str:
    before, now = committed.get("dataset_inputs") or {}, dataset_inputs(cfg)
    changed = sorted(k for k in set(before) | set(now) if before.get(k, "<unset>") != now.get(k, "<unset>"))

    def shown(v: Any) -> str:
        text = json.dumps(v, ensure_ascii=False) if v != "<unset>" else "unset"
        return text if len(text) <= 60 else text[:57] + "..."

    if changed:
        what = "; ".join(f"{k}: {shown(before.get(k, '<unset>'))} -> {shown(now.get(k, '<unset>'))}"
                         for k in changed[:8])
        what += f" (and {len(changed) - 8} more)" if len(changed) > 8 else ""
    elif before:
        what = "the round's problems or teacher samples differ (no config field that shapes the dataset changed)"
    else:
        what = "the settings that shape its dataset (this round was committed before they were recorded)"
    return (f"round {round} is already committed as snapshot {snapshot}, and this config changes what "
            f"its dataset would be: {what}. A committed version is never rewritten: run the new settings "
            f"in a new run directory (`stillhouse run CONFIG --workdir NEW_DIR`), or set the changed "
            f"fields back to continue this run.")


# --------------------------------------------------------------------------- 5. train


def adapter_dir(cfg: RunConfig, round: int, key: str) -> Path:
    return Path(cfg.workdir) / "adapters" / f"round-{round}" / key[:16]


def train_target(cfg: RunConfig, round: int, version: StepResult,
                 previous: StepResult | None) -> tuple[str, Path, str | None]:
    """The training's key, its adapter folder and the adapter it starts from (None: the base model)."""
    init = previous.path if (previous is not None and cfg.training.init == "previous") else None
    key = parquet_io.content_hash(
        {"version": version.key, "init": previous.key if init else None,
         **cfg.section_dict("student", "training", "prompts")}
    )
    return key, adapter_dir(cfg, round, key), init


def train_student(
    cfg: RunConfig, round: int, version: StepResult, previous: StepResult | None,
    progress: Progress | None = None,
) -> StepResult:
    """LoRA fine-tune the student on the round's version with the weighted loss."""
    from stillhouse.tasks.models.resolve import load_tokenizer
    from stillhouse.tasks.prompts import has_chat_template, render_prompt, solve_messages
    from stillhouse.tasks.training.data import TrainExample
    from stillhouse.tasks.training.trainer import finished_result, train_lora

    key, out, init = train_target(cfg, round, version, previous)
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
                 "train_seconds": result.train_seconds, "train_tokens": result.tokens,
                 "model_seconds": model_seconds},
    )


# --------------------------------------------------------------------------- 6. evaluate


BASE_ROUND = -1  # eval_results rows of the untrained student carry this round


def _evaluate_into(out: Path, cfg: RunConfig, round: int, key: str, evals: list[Problem], pool: list[Problem],
                   progress: Progress | None, adapter: str | None = None, adapter_key: str | None = None):
    """The student's answers, generated and scored, as out/eval.parquet; returns (EvalResult, model seconds)."""
    from stillhouse.tasks.evaluation import evaluate_student

    with open_backend(cfg.student.model, cache_dir(cfg), step="student", batch_size=cfg.evaluation.batch_size,
                      adapter=adapter, adapter_key=adapter_key) as student:
        res = evaluate_student(student, evals, pool, cfg.evaluation, cfg.prompts,
                               verifier=cfg.verifier, seed=cfg.sampling.seed, progress=progress)
    rows = [{"round": round, "student_key": key[:32], **{k: r[k] for k in (
        "eval_set", "problem_id", "sample_index", "response", "extracted", "correct")}}
        for r in res.rows]
    parquet_io.write_parquet_atomic(pa.Table.from_pylist(rows), out / "eval.parquet")
    return res, student.model_seconds, {"prompt_tokens": student.prompt_tokens,
                                        "completion_tokens": student.completion_tokens}


def evaluate_base(cfg: RunConfig, progress: Progress | None = None) -> StepResult:
    """The untrained student (its base model, no adapter) on the eval sets, once per run, with the
    same prompts and greedy decoding as every round: the row each trained round is compared with."""
    with open_catalog(cfg, read_only=True) as cat:
        _, evals = pool_and_eval(cat, 0)
    key = parquet_io.content_hash(
        {"adapter": None, "student": cfg.student.model.model_dump(mode="json", exclude=TRANSPORT_FIELDS),
         "eval": [p.id for p in evals], **cfg.section_dict("evaluation", "verifier", "prompts")}
    )
    model_seconds = 0.0

    def compute(out: Path) -> dict[str, Any]:
        nonlocal model_seconds
        res, model_seconds, tokens = _evaluate_into(out, cfg, BASE_ROUND, key, evals, [], progress)
        return {"summary": res.summary(), "tokens": tokens}

    out, computed = parquet_io.cached_output(cache_dir(cfg), "evaluate-base", key, compute)
    table = parquet_io.read_output(out)
    if table.num_rows:
        with open_catalog(cfg) as cat:
            cat.add_eval_results(table)
    meta = parquet_io.read_manifest(out)["meta"]
    return StepResult("evaluate-base", key, str(out), computed,
                      metrics={**_accuracy_metrics(meta["summary"]), **meta.get("tokens", {}),
                               "student_key": key[:32], "model_seconds": model_seconds})


def _accuracy_metrics(summary: dict[str, Any]) -> dict[str, Any]:
    # n and the 95% Wilson interval travel with every accuracy.
    return {"student_accuracy": summary["accuracy"], "student_overall": summary["overall_accuracy"],
            "eval_counts": summary["eval_counts"], "student_accuracy_ci": summary.get("accuracy_ci"),
            "student_overall_ci": summary.get("overall_ci"), "eval_total": summary.get("eval_total")}


def same_answers_as_base(evaluated: StepResult, base: StepResult) -> float | None:
    """Share of eval problems whose greedy answer is character-for-character the base model's.
    1.0 after training means the adapter most likely was not applied (a known failure of
    evaluation harnesses), not that training did nothing: a trained LoRA moves some answers."""
    def greedy(path: str) -> dict[tuple[str, str], str]:
        t = parquet_io.read_output(Path(path))
        return {(r["eval_set"], r["problem_id"]): r["response"] for r in t.to_pylist() if r["eval_set"] != "pool"}

    ours, theirs = greedy(evaluated.path), greedy(base.path)
    shared = set(ours) & set(theirs)
    return sum(ours[k] == theirs[k] for k in shared) / len(shared) if shared else None


def evaluate(cfg: RunConfig, round: int, trained: StepResult, base: StepResult | None = None,
             progress: Progress | None = None) -> StepResult:
    """Student (base + this round's adapter): greedy accuracy per eval set, pass rate on the pool;
    with `base`, the share of eval answers identical to the untrained student's."""
    with open_catalog(cfg, read_only=True) as cat:
        pool, evals = pool_and_eval(cat, round)
    if cfg.evaluation.pool_k == 0:
        pool = []  # no pass rates asked for (the config allows it only where nothing splits)
    key = parquet_io.content_hash(
        {"adapter": trained.key, "pool": [p.id for p in pool], "eval": [p.id for p in evals],
         **cfg.section_dict("evaluation", "verifier", "prompts")}
    )
    model_seconds = 0.0

    def compute(out: Path) -> dict[str, Any]:
        nonlocal model_seconds
        res, model_seconds, tokens = _evaluate_into(out, cfg, round, key, evals, pool, progress,
                                                    adapter=trained.path, adapter_key=trained.key)
        return {"summary": res.summary(), "pass_rates": res.pass_rates, "tokens": tokens}

    out, computed = parquet_io.cached_output(cache_dir(cfg), "evaluate", key, compute)
    table = parquet_io.read_output(out)
    meta = parquet_io.read_manifest(out)["meta"]
    with open_catalog(cfg) as cat:
        cat.add_eval_results(table)
    summary = meta["summary"]
    result = StepResult(
        "evaluate", key, str(out), computed,
        metrics={**_accuracy_metrics(summary), **meta.get("tokens", {}),
                 "pool_mean_pass_rate": summary["pool_mean_pass_rate"], "student_key": key[:32],
                 "model_seconds": model_seconds},
    )
    if base is not None:
        same = same_answers_as_base(result, base)
        result.metrics["same_answers_as_base"] = same
        if same == 1.0:
            log.warning(
                "round %d: the trained student's greedy answers equal the untrained student's on every "
                "eval problem: check that the adapter %s is applied by the %r backend",
                round, trained.path, cfg.student.model.backend,
            )
    return result


# --------------------------------------------------------------------------- 7. split


def split_pool(cfg: RunConfig, round: int, evaluated: StepResult) -> StepResult:
    """Pool problems -> easy (the student solves them) / hard (it does not) / mid (FDD).

    The labels go to the catalog (split_labels, keyed by the evaluated student); synthesis reads
    them from there.
    """
    from stillhouse.tasks.split import split_by_pass_rate

    meta = parquet_io.read_manifest(evaluated.path)["meta"]
    res = split_by_pass_rate(meta["pass_rates"], cfg.split.easy_threshold, cfg.split.hard_threshold)
    key = parquet_io.content_hash({"evaluated": evaluated.key, **cfg.section_dict("split")})
    rows = [
        {"round": round, "student_key": student_key(evaluated), "problem_id": pid,
         "pass_rate": float(meta["pass_rates"][pid]), "label": label}
        for pid, label in sorted(res.labels.items())
    ]
    with open_catalog(cfg) as cat:
        added = cat.add_split_labels(rows)
    return StepResult(
        "split", key, None, added > 0,
        metrics={"easy": res.counts["easy"], "hard": res.counts["hard"], "mid": res.counts["mid"]},
    )


def student_key(evaluated: StepResult) -> str:
    """The key under which a student's eval results and split labels are in the catalog."""
    return evaluated.key[:32]


# --------------------------------------------------------------------------- 8. synthesize


def synthesize_problems(cfg: RunConfig, round: int, evaluated: StepResult, split: StepResult,
                        progress: Progress | None = None) -> StepResult:
    """The teacher writes harder variants of easy problems and similar ones for hard problems;
    survivors (parsed, deduplicated, uncontaminated, majority-answered) join round r+1's pool, and
    every generation, kept or dropped and why, is recorded in the catalog (synthesis_records)."""
    from stillhouse.tasks.split import SplitResult
    from stillhouse.tasks.synthesis.synthesize import synthesize

    with open_catalog(cfg, read_only=True) as cat:
        pool, evals = pool_and_eval(cat, round)
        labels = SplitResult(cat.split_labels(round, student_key(evaluated)))
    easy, hard = labels.select(pool, "easy"), labels.select(pool, "hard")
    key = parquet_io.content_hash(
        {"split": split.key, "easy": [p.id for p in easy], "hard": [p.id for p in hard],
         **cfg.section_dict("synthesis", "prompts", "sampling", "verifier", "teacher")}
    )
    model_seconds = 0.0

    def compute(out: Path) -> dict[str, Any]:
        nonlocal model_seconds
        check_budget(cfg, f"round {round}'s synthesis")
        with open_backend(cfg.teacher, cache_dir(cfg), step="teacher", batch_size=cfg.sampling.batch_size) as teacher:
            res = synthesize(teacher, easy, hard, pool, evals, round, cfg.synthesis, cfg.prompts,
                             cfg.sampling, verifier=cfg.verifier, progress=progress)
        model_seconds = teacher.model_seconds
        if res.problems:
            parquet_io.write_parquet_atomic(pa.Table.from_pylist([p.to_row() for p in res.problems]),
                                            out / "problems.parquet")
        if res.records:
            parquet_io.write_parquet_atomic(_records_table(res.records, key), out / RECORDS_FILE)
        return {"counts": res.counts, "tokens": {"prompt_tokens": teacher.prompt_tokens,
                                                 "completion_tokens": teacher.completion_tokens}}

    out, computed = parquet_io.cached_output(cache_dir(cfg), "synthesize", key, compute)
    meta = parquet_io.read_manifest(out)["meta"]
    counts = meta["counts"]
    new_rows = parquet_io.read_parquet(out / "problems.parquet").to_pylist() if counts["kept"] else []
    records = parquet_io.read_parquet(out / RECORDS_FILE) if (out / RECORDS_FILE).is_file() else []
    with open_catalog(cfg) as cat:
        added, _ = cat.add_synthesis(new_rows, records)
    return StepResult(
        "synthesize", key, str(out), computed,
        metrics={"synth_generated": counts["generated"], "synth_kept": counts["kept"],
                 "synth_dropped": counts["dropped"], "synth_added": added,
                 **meta.get("tokens", {}), "model_seconds": model_seconds},
    )


RECORDS_FILE = "records.parquet"


def _records_table(records: list[dict[str, Any]], synthesis_key: str) -> pa.Table:
    """The synthesis step's record of every generation, as the catalog's synthesis_records rows."""
    return pa.Table.from_pylist([
        {"round": r["round"], "synthesis_key": synthesis_key[:32], "generation_key": r["key"],
         "parent_id": r["parent_id"], "operation": r["operation"], "seed": r["seed"],
         "reply": r["raw_text"], "finish_reason": r["finish_reason"], "question": r["question"],
         "status": r["status"], "reason": r["reason"], "detail": r["detail"],
         "problem_id": r["problem_id"], "answer": r["answer"], "agreement": r["agreement"],
         "votes": None if r["votes"] is None else json.dumps(r["votes"])}
        for r in records
    ])
