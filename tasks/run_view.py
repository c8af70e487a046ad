"""What a round's record says and how it reads: the round summary assembled from the steps'
results, and the Markdown an engineer sees for it in the Prefect UI.

Plain functions (no Prefect): the flow calls them, `stillhouse status` and the tests read the same
numbers. Conventions everywhere: an accuracy is shown with its 95% Wilson interval and n; shares
and accuracies with 3 decimals, seconds and rates with 1, counts as integers.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from stillhouse.tasks.evaluation import accuracy_text, wilson_interval

# Keys a step reports for the ledger; in the round summary they appear as per-role totals instead
# (several steps report them, and a merged dict would keep only the last step's).
LEDGER_KEYS = ("prompt_tokens", "completion_tokens", "requests", "train_tokens")


def workdir_id(workdir: str | Path) -> str:
    """Six hex digits of the run directory's absolute path: tells two runs of one name apart."""
    return hashlib.sha256(str(Path(workdir).resolve()).encode("utf-8")).hexdigest()[:6]


def run_label(run_name: str, workdir: str | Path) -> str:
    """The run's name in Prefect: flow-run names and artifact keys ("smoke-3f2a1c")."""
    return f"{run_name}-{workdir_id(workdir)}"


def config_hash(cfg: Any) -> str:
    """Content hash of the config (12 hex digits), without the fields that only place or name the
    run (run_name, workdir, cache_dir) or extend it (rounds): equal hashes, equal method."""
    from stillhouse.storage.parquet_io import content_hash

    data = cfg.model_dump(mode="json", exclude={"run_name", "workdir", "cache_dir", "rounds"})
    return content_hash(data)[:12]


def assemble_round(round: int, results: list[Any], ledger_costs: dict[str, Any], wall_seconds: float,
                   previous_summary: dict[str, Any] | None, previous_round: dict[str, Any] | None,
                   last_round: bool, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The round's summary (rounds/round-<r>.json) from its steps' results (StepResult-like:
    name, computed, metrics).

    A rerun that finds every output complete must not replace what the round cost with the cost of
    looking (issue 15): model seconds come from the ledger, which keeps the figures of the
    invocation that did the work; `generated` and `wall_seconds` are kept from the summary that
    recorded the work when the steps that own them did nothing now."""
    metrics: dict[str, Any] = {"round": round}
    for r in results:
        metrics.update({k: v for k, v in r.metrics.items() if k not in LEDGER_KEYS})
    computed = [r.name for r in results if r.computed]
    metrics["steps_computed"] = computed
    metrics["steps_found_complete"] = [r.name for r in results if not r.computed]
    metrics.update(ledger_costs)
    metrics["model_seconds"] = ledger_costs.get("ledger_model_seconds", 0.0)
    metrics.pop("ledger_model_seconds", None)
    metrics["wall_seconds"] = wall_seconds
    if previous_summary:
        if "sample" not in computed and "generated" in previous_summary:
            metrics["generated"] = previous_summary["generated"]
        if not computed and "wall_seconds" in previous_summary:
            metrics["wall_seconds"] = previous_summary["wall_seconds"]
            metrics["rerun_wall_seconds"] = wall_seconds
    prev_pool = previous_round.get("pool") if previous_round else None
    metrics["pool_added"] = metrics["pool"] - prev_pool if prev_pool is not None else None
    metrics["previous_snapshot"] = previous_round.get("snapshot") if previous_round else None
    metrics["last_round"] = last_round
    metrics.update(extra or {})
    return metrics


# --------------------------------------------------------------------------- formatting


def cell(text: Any) -> str:
    """A Markdown table cell: pipes escaped, newlines flattened."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def num(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return str(v)


def table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return lines


def _accuracies(m: dict[str, Any], sets: list[str]) -> list[str]:
    acc, counts = m.get("student_accuracy") or {}, m.get("eval_counts") or {}
    cells = [accuracy_text(acc.get(s), counts.get(s)) for s in sets]
    total = m.get("eval_total") or sum(counts.values())
    return cells + [accuracy_text(m.get("student_overall"), total)]


def _overall(m: dict[str, Any]) -> tuple[float, int] | None:
    total = m.get("eval_total") or sum((m.get("eval_counts") or {}).values())
    if m.get("student_overall") is None or not total:
        return None
    return m["student_overall"], total


def change_text(now: dict[str, Any], before: dict[str, Any] | None, label: str) -> str | None:
    """The overall accuracy's change from `before`, and whether it is outside the intervals.

    A difference smaller than both 95% intervals' half-widths is called what it is at this n:
    no measured change, rather than a number that invites reading."""
    a, b = _overall(now), (_overall(before) if before else None)
    if a is None or b is None:
        return None
    (acc, n), (acc0, n0) = a, b
    delta = acc - acc0
    lo, hi = wilson_interval(round(acc * n), n)
    lo0, hi0 = wilson_interval(round(acc0 * n0), n0)
    overlap = lo <= hi0 and lo0 <= hi
    verdict = ("no measured change: the 95% intervals overlap" if overlap
               else "outside both 95% intervals")
    return f"{delta:+.3f} vs {label} ({acc0:.3f} -> {acc:.3f}, n={n}; {verdict})"


def round_markdown(run_name: str, label: str, m: dict[str, Any], history: list[dict[str, Any]],
                   base: dict[str, Any] | None, rounds_total: int, report_html: str | None = None,
                   plots: dict[str, str] | None = None) -> str:
    """The round's page in the Prefect UI: identity and lineage, accuracy with n and interval
    against the base row and every round so far, the pool's accounting, training, costs, plots."""
    r = m["round"]
    lines = [f"# {cell(run_name)}: round {r} of {rounds_total}", ""]
    ident = [f"run `{label}`", f"config `{m.get('config_hash', '-')}`",
             f"dataset version: snapshot {m.get('snapshot', '-')}"]
    if m.get("previous_snapshot") is not None:
        ident.append(f"previous round {r - 1}: snapshot {m['previous_snapshot']}")
    lines.append(" · ".join(ident))
    if report_html:
        # The path as text too: browsers do not follow a file:// link from an http:// page.
        path = Path(report_html).resolve()
        lines += ["", f"HTML report (all rounds, plots): [{cell(path)}]({path.as_uri()})"]
    done, found = m.get("steps_computed") or [], m.get("steps_found_complete") or []
    lines += ["", ("**Resumed, no work done**: every step found its output complete "
                   f"({', '.join(found)})." if not done else
                   f"Steps that did work: {', '.join(done)}"
                   + (f"; found complete (no work): {', '.join(found)}" if found else "") + ".")]

    sets = sorted({s for x in [*history, m, base or {}] for s in (x.get("student_accuracy") or {})})
    rows = []
    if base:
        rows.append(["base (untrained)", *_accuracies(base, sets)])
    for h in history:
        if h["round"] != r:
            rows.append([f"round {h['round']}", *_accuracies(h, sets)])
    rows.append([f"**round {r}**", *_accuracies(m, sets)])
    lines += ["", "## Student accuracy (greedy; 95% Wilson interval; n problems)", ""]
    lines += table(["", *sets, "all eval sets"], rows)
    prev = next((h for h in history if h["round"] == r - 1), None)
    changes = [c for c in (change_text(m, prev, f"round {r - 1}"), change_text(m, base, "untrained"))
               if c]
    lines += ["", *[f"- change {c}" for c in changes]] if changes else []

    pool = m.get("pool")
    added = m.get("pool_added")
    easy, mid, hard = m.get("easy"), m.get("mid"), m.get("hard")
    labelled = sum(x or 0 for x in (easy, mid, hard))
    split_note = f"{num(easy)} / {num(mid)} / {num(hard)}"
    split_note += f" (= {labelled:,} of {num(pool)})" if pool is not None else ""
    synth = ("none: last round (its new problems would have no round to join)" if m.get("last_round")
             else f"{num(m.get('synth_generated'))} written / {num(m.get('synth_kept'))} kept, "
                  f"dropped: {_dropped(m.get('synth_dropped'))}")
    pool_rows = [
        ["pool this round", num(pool)],
        ["added since the previous round", "seed pool" if added is None else f"{added:+,}"],
        ["easy / mid / hard (student pass rate)", split_note],
        ["new problems for the next round", synth],
    ]
    lines += ["", "## Pool", ""] + table(["", "count"], pool_rows)

    teach = [
        ["teacher accuracy (samples)", f"{num(m.get('teacher_accuracy'))} of {num(m.get('samples'))} samples"],
        ["zero-weight groups (all right or all wrong)", num(m.get("zero_weight_group_share"))],
        ["mean |weight|", num(m.get("mean_abs_weight"))],
        ["train loss (first -> last step)", f"{num(m.get('train_loss_first'))} -> {num(m.get('train_loss'))}"],
        ["optimizer steps", num(m.get("steps"))],
        ["train tokens/s", num(m.get("tokens_per_s"), 1)],
        ["eval answers identical to the untrained student's", num(m.get("same_answers_as_base"))],
    ]
    lines += ["", "## Teacher and training", ""] + table(["", "value"], teach)

    cost = [
        ["teacher tokens in / out", f"{num(m.get('teacher_tokens_in'))} / {num(m.get('teacher_tokens_out'))}"],
        ["student tokens in / out", f"{num(m.get('student_tokens_in'))} / {num(m.get('student_tokens_out'))}"],
        ["tokens trained", num(m.get("train_tokens"))],
        ["model seconds (when the work was done)", num(m.get("model_seconds"), 1)],
        ["wall seconds (when the work was done)", num(m.get("wall_seconds"), 1)],
        ["teacher cost", num(m.get("cost"), 4)],
    ]
    lines += ["", "## Cost", ""] + table(["", "this round"], cost)
    shards = [[step, num(m.get(f"{step}_shards_total")), num(m.get(f"{step}_shards_reused")),
               num(m.get(f"{step}_shards_done")), num(m.get(f"{step}_shards_failed")),
               num(m.get(f"{step}_shards_resubmitted"))]
              for step in ("sample", "train", "evaluate", "synthesize") if m.get(f"{step}_shards_total")]
    if shards:  # execution.work_pool: the GPU steps ran as shard flow runs on the pool
        lines += ["", "## Shards on the work pool", ""] + table(
            ["step", "shards", "found done", "run now", "failed", "resubmitted"], shards)
    for name, data in (plots or {}).items():
        lines += ["", f"![{name}](data:image/png;base64,{data})"]
    return "\n".join(lines) + "\n"


def _dropped(dropped: Any) -> str:
    if not isinstance(dropped, dict):
        return num(dropped)
    shown = [f"{k} {v}" for k, v in sorted(dropped.items()) if v]
    return f"{sum(dropped.values())} ({', '.join(shown)})" if shown else "0"


def history_markdown(run_name: str, label: str, history: list[dict[str, Any]], base: dict[str, Any] | None,
                     report_html: str | None = None, plots: dict[str, str] | None = None) -> str:
    """The run's accuracy curve: one row per round (and the base row), every accuracy with n and
    interval, the pool's full accounting and the dataset version of each round."""
    sets = sorted({s for x in [*history, base or {}] for s in (x.get("student_accuracy") or {})})
    rows = []
    if base:
        rows.append(["base (untrained)", "-", "-", *_accuracies(base, sets), "-", "-", "-"])
    for m in history:
        split = f"{num(m.get('easy'))} / {num(m.get('mid'))} / {num(m.get('hard'))}"
        rows.append([str(m["round"]), num(m.get("snapshot")), num(m.get("teacher_accuracy")),
                     *_accuracies(m, sets), num(m.get("pool")), split,
                     "last round" if m.get("last_round") else num(m.get("synth_kept"))])
    lines = [f"# {cell(run_name)}: accuracy across rounds", "", f"run `{label}`"]
    if report_html:
        path = Path(report_html).resolve()
        lines += ["", f"HTML report: [{cell(path)}]({path.as_uri()})"]
    lines += [""] + table(["round", "snapshot", "teacher acc", *[f"student {s}" for s in sets], "student all",
                           "pool", "easy / mid / hard", "new problems"], rows)
    for name, data in (plots or {}).items():
        lines += ["", f"![{name}](data:image/png;base64,{data})"]
    return "\n".join(lines) + "\n"


PLOTS = ("accuracy", "reward", "weight")


def report_plots(report_dir: str | Path) -> dict[str, str]:
    """The report's PNG plots (written by tasks/report.build_report) as base64, for embedding."""
    import base64

    out = {}
    for name in PLOTS:
        path = Path(report_dir) / f"{name}.png"
        if path.is_file():
            out[name] = base64.b64encode(path.read_bytes()).decode()
    return out
