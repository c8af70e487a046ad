"""experiment.json as a Markdown table and an HTML page with a plot (accuracy per arm with its
95% interval, and each arm's paired difference to the control)."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

from stillhouse.storage import parquet_io
from stillhouse.tasks.experiment.results import OVERALL


def _ci(d: dict[str, Any], signed: bool = False) -> str:
    f = "{:+.3f}" if signed else "{:.3f}"
    lo, hi = d["ci95"]
    return f"{f.format(d['mean'])} [{f.format(lo)}, {f.format(hi)}]"


def _p(p: float) -> str:
    return f"{p:.2g}" if p < 0.01 else f"{p:.2f}"


def _mcnemar(vs: dict[str, Any]) -> str:
    ps = vs["mcnemar_p_per_seed"]
    if len(ps) == 1:
        return _p(ps[0])
    return f"{_p(min(ps))}–{_p(max(ps))} ({len(ps)} seeds)"


def markdown_table(summary: dict[str, Any]) -> str:
    """One row per arm: accuracy per eval set and overall (95% CI), the paired difference to the
    control with its CI, McNemar p and minimum detectable effect, and the training it got."""
    sets = list(summary["eval_sets"])
    control = summary["control"]
    head = (["arm"] + [f"{s} (n={summary['eval_sets'][s]})" for s in sets]
            + [f"Δ overall vs {control} [95% CI]", "significant", "McNemar p", "better / worse", "MDE (80%)",
               "train steps", "samples trained"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm in summary["arms"]:
        name = arm["name"]
        acc = summary["accuracy"][name]
        cells = [f"**{name}**" if name == control else name]
        cells += [_ci(acc[s]) if s in acc else "-" for s in sets]
        vs = summary["vs_control"].get(name, {}).get(OVERALL)
        if vs:
            cells += [_ci(vs, signed=True), "yes" if vs["significant"] else "no", _mcnemar(vs),
                      f"{vs['arm_better']} / {vs['arm_worse']}", f"{vs['mde80']:.3f}"]
        else:
            cells += ["(control)" if name == control else "-", "-", "-", "-", "-"]
        runs = summary["runs"].get(name)
        if runs:
            steps = sorted({r["train_steps"] for r in runs.values()})
            used = [r["train_samples_used"] for r in runs.values()]
            cells += ["/".join(map(str, steps)), f"{sum(used) / len(used):.0f}"]
        else:
            cells += ["0", "0"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(summary: dict[str, Any]) -> str:
    seeds = summary["seeds"]
    gen = summary["teacher_samples_per_seed"]
    used = {s: sum(a.values()) for s, a in summary["teacher_samples_per_arm"].items()}
    lines = [
        f"# Experiment {summary['name']}",
        "",
        f"Seeds {seeds}; control arm **{summary['control']}**; accuracies are greedy pass@1 of each "
        "arm's final student, mean over seeds and problems with a 95% bootstrap interval (seeds and "
        "problems resampled); Δ is paired (same problems, same teacher samples per seed) and "
        "significant when its interval excludes 0; the exact McNemar test is per seed; MDE: the "
        "paired difference detectable with 80% power at this number of problems.",
        "",
        markdown_table(summary),
        "",
        "Arms: " + "; ".join(f"{a['name']}: {a['description'] or a['overrides']}" for a in summary["arms"]) + ".",
        "",
        f"Teacher samples generated per seed: {gen}, for {used} used by the arms together (one "
        "cache shared by every run). "
        f"Wall time of all runs: {summary['wall_seconds'] / 60:.1f} min.",
    ]
    return "\n".join(lines) + "\n"


def plot_png(summary: dict[str, Any]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = [a["name"] for a in summary["arms"]]
    acc = [summary["accuracy"][a].get(OVERALL) for a in arms]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    xs = range(len(arms))
    means = [a["mean"] if a else float("nan") for a in acc]
    err = [[m - a["ci95"][0] for m, a in zip(means, acc)], [a["ci95"][1] - m for m, a in zip(means, acc)]]
    left.errorbar(xs, means, yerr=err, fmt="o", capsize=4)
    left.set_xticks(list(xs), arms, rotation=30, ha="right")
    left.set_ylabel("eval accuracy (overall)")
    left.set_title("accuracy, 95% CI")
    others = [a for a in arms if a in summary["vs_control"]]
    diffs = [summary["vs_control"][a][OVERALL] for a in others]
    dm = [d["mean"] for d in diffs]
    derr = [[m - d["ci95"][0] for m, d in zip(dm, diffs)], [d["ci95"][1] - m for m, d in zip(dm, diffs)]]
    right.errorbar(range(len(others)), dm, yerr=derr, fmt="s", capsize=4, color="tab:orange")
    right.axhline(0, color="grey", lw=1)
    right.set_xticks(list(range(len(others))), others, rotation=30, ha="right")
    right.set_title(f"paired difference to {summary['control']}, 95% CI")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def write_report(workdir: str | Path, summary: dict[str, Any]) -> tuple[Path, Path]:
    """<workdir>/report.md and report.html (plot embedded); returns their paths."""
    workdir = Path(workdir)
    md = markdown(summary)
    png = plot_png(summary)
    parquet_io.write_bytes_atomic(png, workdir / "experiment.png")
    md_path = parquet_io.write_bytes_atomic((md + "\n![experiment](experiment.png)\n").encode(), workdir / "report.md")
    table = _html_table(summary)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(summary['name'])}</title>"
            "<style>table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px}</style>"
            f"</head><body><h1>Experiment {html.escape(summary['name'])}</h1>{table}"
            f"<p>{html.escape(md.split(chr(10) + chr(10))[1])}</p>"
            f"<img src='data:image/png;base64,{base64.b64encode(png).decode()}'/></body></html>")
    html_path = parquet_io.write_bytes_atomic(page.encode(), workdir / "report.html")
    return md_path, html_path


def _html_table(summary: dict[str, Any]) -> str:
    rows = [line.strip("|").split(" | ") for line in markdown_table(summary).splitlines()]
    head, body = rows[0], rows[2:]
    th = "".join(f"<th>{html.escape(c.strip())}</th>" for c in head)
    trs = "".join("<tr>" + "".join(f"<td>{html.escape(c.strip().strip('*'))}</td>" for c in r) + "</tr>" for r in body)
    return f"<table><tr>{th}</tr>{trs}</table>"
