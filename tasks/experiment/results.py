"""Collect an experiment's finished runs into experiment.json: per-arm accuracy per eval set with
intervals, and every arm's paired difference to the control (see stats.py for the statistics)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stillhouse.storage import parquet_io
from stillhouse.tasks.config import RunConfig
from stillhouse.tasks.evaluation import POOL
from stillhouse.tasks.experiment.spec import BASE_ARM, Experiment
from stillhouse.tasks.experiment.stats import accuracy_interval, paired_difference
from stillhouse.tasks.report import base_summary, round_summaries

OVERALL = "overall"  # every eval set's problems together
Outcomes = dict[str, dict[str, bool]]  # eval set -> problem id -> greedy answer correct


def run_outcomes(cfg: RunConfig) -> tuple[Outcomes, Outcomes, dict[str, Any]]:
    """A finished run's final-round student and its untrained base, as eval outcomes, plus the
    run's cost figures. Reads the catalog (eval_results) by the evaluations' student keys."""
    from stillhouse.tasks.steps import open_catalog

    history = {m["round"]: m for m in round_summaries(cfg.workdir)}
    base = base_summary(cfg.workdir)
    last = cfg.rounds - 1
    if last not in history or base is None:
        raise ValueError(f"run {cfg.workdir} has not finished round {last} (no rounds/round-{last}.json)")
    keys = {history[last]["student_key"]: "final", base["student_key"]: "base"}
    out: dict[str, Outcomes] = {"final": {}, "base": {}}
    with open_catalog(cfg, read_only=True) as cat:
        rows = cat.read("eval_results").to_pylist()
    for r in rows:
        which = keys.get(r["student_key"])
        if which and r["eval_set"] != POOL and r["sample_index"] == 0:
            out[which].setdefault(r["eval_set"], {})[r["problem_id"]] = bool(r["correct"])
    rounds = [history[r] for r in sorted(history)]
    cost = {
        "workdir": str(cfg.workdir),
        "rounds": len(rounds),
        "wall_seconds": sum(m.get("wall_seconds", 0.0) for m in rounds),
        "model_seconds": sum(m.get("model_seconds", 0.0) for m in rounds),
        # Samples this run's teacher generated itself in the invocation that last ran its rounds
        # (0 where another arm's were found in the cache, or on a rerun of finished rounds).
        "teacher_generated": sum(m.get("generated", 0) for m in rounds),
        # The teacher calls (content keys of the cached sample sets) and their sizes, per round:
        # arms that share a call share its samples.
        "teacher_calls": {m["teacher_call"]: m.get("samples", 0) for m in rounds if m.get("teacher_call")},
        "teacher_samples": sum(m.get("samples", 0) for m in rounds),
        "train_steps": sum(m.get("steps") or 0 for m in rounds),
        "train_samples_used": sum(m.get("samples_used") or 0 for m in rounds),
        "train_samples_zero_weight": sum(m.get("samples_zero_weight") or 0 for m in rounds),
        "synth_kept": sum(m.get("synth_kept") or 0 for m in rounds),
    }
    return out["final"], out["base"], cost


def _matrix(per_seed: list[Outcomes], eval_set: str, problems: list[str]) -> list[list[bool]]:
    return [[o[eval_set][p] for p in problems] for o in per_seed]


def _with_overall(o: Outcomes) -> Outcomes:
    merged = {f"{s}/{p}": v for s, probs in o.items() for p, v in probs.items()}
    return {**o, OVERALL: merged}


def summarize(exp: Experiment, finals: dict[tuple[str, int], Outcomes], bases: dict[int, Outcomes],
              costs: dict[tuple[str, int], dict[str, Any]]) -> dict[str, Any]:
    """experiment.json's content from every (arm, seed)'s outcomes; `bases` holds each seed's
    untrained student (the same model for every arm of a seed)."""
    c = exp.config
    arms = exp.arm_order()
    outcomes: dict[str, list[Outcomes]] = {
        arm: [_with_overall(bases[s] if arm == BASE_ARM else finals[(arm, s)]) for s in c.seeds] for arm in arms
    }
    sets = sorted({s for per_seed in outcomes.values() for o in per_seed for s in o if s != OVERALL}) + [OVERALL]
    problems: dict[str, list[str]] = {}
    for s in sets:
        # Only problems every arm and seed answered: the comparison must be on the same problems.
        common = set.intersection(*(set(o.get(s, {})) for per_seed in outcomes.values() for o in per_seed))
        problems[s] = sorted(common)
    accuracy = {
        arm: {s: accuracy_interval(_matrix(outcomes[arm], s, problems[s]), c.bootstrap_samples)
              for s in sets if problems[s]}
        for arm in arms
    }
    versus = {
        arm: {s: paired_difference(_matrix(outcomes[arm], s, problems[s]),
                                   _matrix(outcomes[c.control], s, problems[s]), c.bootstrap_samples)
              for s in sets if problems[s]}
        for arm in arms if arm != c.control
    }
    runs = {arm: {str(s): costs[(arm, s)] for s in c.seeds} for arm in c.arms}
    # What the teacher had to generate per seed: the distinct sample sets its arms used (an arm that
    # found another's in the shared cache adds nothing). Read from the runs' records, so it is the
    # same whether the experiment ran in one go or was killed and rerun.
    needed = {str(s): sum({k: n for arm in c.arms for k, n in costs[(arm, s)]["teacher_calls"].items()}.values())
              for s in c.seeds}
    per_arm = {str(s): {arm: sum(costs[(arm, s)]["teacher_calls"].values()) for arm in c.arms} for s in c.seeds}
    return {
        "name": c.name,
        "control": c.control,
        "seeds": list(c.seeds),
        "arms": [{"name": a, "description": "untrained student (no adapter)" if a == BASE_ARM
                  else c.arms[a].description, "overrides": {} if a == BASE_ARM else c.arms[a].overrides}
                 for a in arms],
        "optimizer_steps": c.optimizer_steps,
        "eval_sets": {s: len(problems[s]) for s in sets},
        "accuracy": accuracy,
        "vs_control": versus,
        "runs": runs,
        # Teacher samples per seed: what the arms needed together (distinct sample sets) and what
        # each arm used; with a shared cache and identical teacher inputs the first equals one
        # arm's worth, without sharing it would be the sum of the second.
        "teacher_samples_per_seed": needed,
        "teacher_samples_per_arm": per_arm,
        "wall_seconds": sum(r["wall_seconds"] for arm in runs.values() for r in arm.values()),
    }


def write_experiment_json(exp: Experiment, summary: dict[str, Any]) -> Path:
    return parquet_io.write_json_atomic(summary, exp.workdir / "experiment.json")
