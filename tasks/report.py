"""The run report: accuracy per round and the reward / weight distributions, as Markdown and HTML.

Reads the per-round summaries the flow records (`<workdir>/rounds/round-<r>.json`) and the samples
of each committed round from the catalog. Plots are PNGs drawn with matplotlib's Agg backend and
embedded in the HTML, so the report is one file a user can open anywhere.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

from stillhouse.storage import parquet_io
from stillhouse.tasks.evaluation import accuracy_text


class SummaryError(ValueError):
    """A round summary file that cannot be read; the message names the file."""


def _read_summary(path: Path) -> dict[str, Any]:
    """One summary file (rounds/round-<r>.json, rounds/base.json), or SummaryError naming it."""
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, RecursionError) as err:  # JSONDecodeError, UnicodeDecodeError
        raise SummaryError(
            f"round summary {path} is not valid JSON ({err}); it is rewritten when the round runs "
            "again: rerun `stillhouse run` on this workdir (finished steps are not redone)"
        ) from None
    except OSError as err:
        raise SummaryError(f"cannot read round summary {path}: {err.strerror or err}") from None
    if not isinstance(data, dict):
        raise SummaryError(f"round summary {path} holds {type(data).__name__}, not a JSON object")
    return data


def round_summaries(workdir: str | Path) -> list[dict[str, Any]]:
    files = [p for p in (Path(workdir) / "rounds").glob("round-*.json") if p.stem[len("round-"):].isdigit()]
    files.sort(key=lambda p: int(p.stem[len("round-"):]))
    return [_read_summary(p) for p in files]


def record_round(workdir: str | Path, round: int, metrics: dict[str, Any]) -> Path:
    return parquet_io.write_json_atomic(metrics, Path(workdir) / "rounds" / f"round-{round}.json")


def round_summary(workdir: str | Path, round: int) -> dict[str, Any] | None:
    """Round `round`'s recorded summary, or None when it has none yet."""
    path = Path(workdir) / "rounds" / f"round-{round}.json"
    return _read_summary(path) if path.is_file() else None


def record_base(workdir: str | Path, metrics: dict[str, Any]) -> Path:
    """The untrained student's accuracies (rounds/base.json, beside the rounds' summaries)."""
    return parquet_io.write_json_atomic(metrics, Path(workdir) / "rounds" / "base.json")


def base_summary(workdir: str | Path) -> dict[str, Any] | None:
    path = Path(workdir) / "rounds" / "base.json"
    return _read_summary(path) if path.is_file() else None


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def _plots(history: list[dict[str, Any]], samples: dict[int, dict[str, list[float]]],
           base: dict[str, Any] | None = None) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out: dict[str, str] = {}
    rounds = [m["round"] for m in history]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(rounds, [m.get("teacher_accuracy") for m in history], marker="o", label="teacher (samples)")
    sets = sorted({s for m in history for s in (m.get("student_accuracy") or {})})
    for s in sets:
        # Each accuracy with its 95% interval: at a few dozen eval problems the bars are what
        # says whether a round's change is a change.
        acc = [(m.get("student_accuracy") or {}).get(s) for m in history]
        cis = [(m.get("student_accuracy_ci") or {}).get(s) for m in history]
        err = [[a - ci[0] if a is not None and ci else 0 for a, ci in zip(acc, cis)],
               [ci[1] - a if a is not None and ci else 0 for a, ci in zip(acc, cis)]]
        ax.errorbar(rounds, [a if a is not None else float("nan") for a in acc], yerr=err, marker="s",
                    capsize=3, label=f"student: {s} (95% CI)")
    ax.plot(rounds, [m.get("pool_mean_pass_rate") for m in history], marker="^", ls="--",
            label="student pass rate (pool)")
    if base and base.get("student_overall") is not None:
        ax.axhline(base["student_overall"], color="grey", ls=":", label="untrained student (all eval)")
    ax.set_xlabel("round")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xticks(rounds)
    ax.legend(fontsize=8)
    ax.set_title("Accuracy per round")
    out["accuracy"] = _png(fig)
    plt.close(fig)

    for column in ("reward", "weight"):
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for r, cols in sorted(samples.items()):
            if cols[column]:
                ax.hist(cols[column], bins=30, alpha=0.5, label=f"round {r}")
        ax.set_xlabel(column)
        ax.set_ylabel("samples")
        ax.set_title(f"{column.capitalize()} distribution")
        ax.legend(fontsize=8)
        out[column] = _png(fig)
        plt.close(fig)
    return out


def md_cell(value: Any) -> str:
    """One Markdown table cell: numbers at one precision, pipes escaped, no line breaks.

    An unescaped `|` (the header `mean |w|`, a model's text in a drop detail) splits the cell, so
    GitHub and markdown-it see more cells than the delimiter row has and render no table.

    >>> md_cell(0.39062), md_cell(312.69581), md_cell(None), md_cell("a|b\\nc")
    ('0.391', '312.696', '-', 'a\\\\|b c')
    """
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return " ".join(str(value).split()).replace("|", "\\|")


def md_row(cells: list[Any]) -> str:
    return "| " + " | ".join(md_cell(c) for c in cells) + " |"


def md_table(header: list[str], rows: list[list[Any]]) -> list[str]:
    """A Markdown table's lines: header, delimiter and one line per row, every cell escaped."""
    return [md_row(header), "|" + "---|" * len(header), *(md_row(r) for r in rows)]


REPORT_COLUMNS = [
    ("pool", "pool"), ("samples", "samples"), ("teacher_accuracy", "teacher acc"),
    ("zero_weight_group_share", "zero-weight groups"), ("mean_abs_weight", "mean |w|"),
    ("train_loss", "train loss"), ("student_overall", "student acc"),
    ("pool_mean_pass_rate", "pool pass rate"), ("easy", "easy"), ("mid", "mid"), ("hard", "hard"),
    ("synth_generated", "synthesized"), ("synth_kept", "kept"),
]


def _drop_rows(history: list[dict[str, Any]]) -> list[list[Any]]:
    """One row per round and reason a synthesized problem was dropped (reason names made readable)."""
    return [[m["round"], str(reason).replace("_", " "), n]
            for m in history for reason, n in sorted((m.get("synth_dropped") or {}).items()) if n]


def _markdown(run: str, history: list[dict[str, Any]], base: dict[str, Any] | None = None) -> str:
    rows = []
    if base:
        rows.append(["base (untrained)"] + [
            accuracy_text(base.get("student_overall"), base.get("eval_total")) if k == "student_overall" else None
            for k, _ in REPORT_COLUMNS])
    for m in history:
        n_eval = m.get("eval_total") or sum((m.get("eval_counts") or {}).values())
        rows.append([m["round"]] + [accuracy_text(m.get(k), n_eval) if k == "student_overall" else m.get(k)
                                    for k, _ in REPORT_COLUMNS])
    lines = [f"# Stillhouse report: {md_cell(run)}", "",
             *md_table(["round"] + [label for _, label in REPORT_COLUMNS], rows)]
    if history and history[-1].get("synth_generated") is None:
        lines += ["", f"Round {history[-1]['round']} is the last: it synthesizes no problems (blank cells)."]
    drops = _drop_rows(history)
    if drops:
        lines += ["", "## Synthesis drops per round", "", *md_table(["round", "reason", "problems"], drops)]
    return "\n".join(lines) + "\n"


def _dropped_markdown(dropped: list[dict[str, Any]], limit: int = 50) -> str:
    """Why the teacher's problems did not join the pool: one line per dropped generation."""
    if not dropped:
        return ""
    rows = [[d["round"], d["parent_id"], d["operation"], d["reason"], d["detail"] or ""] for d in dropped[:limit]]
    lines = ["", "## Dropped synthesized problems", "",
             *md_table(["round", "parent", "operation", "reason", "detail"], rows)]
    if len(dropped) > limit:
        lines.append(f"\n... and {len(dropped) - limit} more (`stillhouse diff` lists them all)")
    return "\n".join(lines) + "\n"


def markdown_html(md: str) -> str:
    """Markdown as HTML with real tables (markdown-it, CommonMark plus GFM tables). Raw HTML in the
    text is escaped, not passed through: drop details quote model output, which is hostile text."""
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark", {"html": False}).enable("table").render(md)


def run_name_of(workdir: Path, history: list[dict[str, Any]]) -> str:
    """The run's name as its round summaries record it; the workdir's folder name for runs whose
    summaries predate that field."""
    for m in reversed(history):
        if isinstance(m.get("run_name"), str) and m["run_name"]:
            return m["run_name"]
    return workdir.resolve().name


_STYLE = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
          "th,td{border:1px solid #bbb;padding:.25em .6em;text-align:right}th{background:#eee}")


def build_report(workdir: str | Path, run_name: str | None = None) -> tuple[Path, Path]:
    """Write <workdir>/report/report.md and report.html; returns their paths."""
    from stillhouse.storage.catalog import Catalog

    workdir = Path(workdir)
    history = round_summaries(workdir)
    if not history:
        raise FileNotFoundError(f"{workdir} has no finished rounds (no rounds/round-*.json)")
    samples: dict[int, dict[str, list[float]]] = {}
    # A snapshot: a report written beside a running run never holds a lock the run's commits need.
    with Catalog.for_workdir(workdir, snapshot=True) as cat:
        committed = [r.round for r in cat.status().rounds if r.status == "committed"]
        for r in committed:
            t = cat.samples_for_round(r).select(["reward", "weight"])
            samples[r] = {"reward": t["reward"].to_pylist(), "weight": t["weight"].to_pylist()}
        records = cat.synthesis_records()
        dropped = [r for r in records.to_pylist() if r["status"] == "dropped"]
    run = run_name or run_name_of(workdir, history)
    base = base_summary(workdir)
    md = _markdown(run, history, base) + _dropped_markdown(dropped)
    plots = _plots(history, samples, base)
    md_path = parquet_io.write_bytes_atomic(
        (md + "\n" + "\n".join(f"![{k}]({k}.png)" for k in plots) + "\n").encode(),
        workdir / "report" / "report.md",
    )
    for name, data in plots.items():
        parquet_io.write_bytes_atomic(base64.b64decode(data), workdir / "report" / f"{name}.png")
    body = "".join(f'<h2>{html.escape(k)}</h2><img src="data:image/png;base64,{v}"/>' for k, v in plots.items())
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(run)}</title>"
            f"<style>{_STYLE}</style></head><body>{markdown_html(md)}{body}</body></html>")
    html_path = parquet_io.write_bytes_atomic(page.encode(), workdir / "report" / "report.html")
    return md_path, html_path
