"""`stillhouse experiment`: every arm x seed of an experiment as a run, then the comparison.

Each (arm, seed) is the ordinary multi-round flow (`distill`) run as a subflow, so the Prefect UI
shows the arms side by side under the experiment's flow run, each with its rounds, steps and
artifacts. Runs go seed by seed, the control arm first: within a seed every arm after the first
finds the teacher's samples (and the untrained student's evaluation) in the experiment's shared
cache. Resuming is the runs' own: a rerun of the experiment finds finished runs complete (no model
work) and continues a run that was cut off where it stopped; the comparison is recomputed from the
runs' catalogs, so it is the same whether the experiment ran in one go or in several.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, tags
from prefect.artifacts import create_markdown_artifact

from stillhouse.flows.distill import distill
from stillhouse.flows.monitoring import artifact_key
from stillhouse.storage.lock import RunLock
from stillhouse.tasks.experiment.report import markdown, write_report
from stillhouse.tasks.experiment.results import run_outcomes, summarize, write_experiment_json
from stillhouse.tasks.experiment.spec import load_experiment
from stillhouse.tasks.run_view import workdir_id


@flow(name="stillhouse-experiment", log_prints=False)
def experiment(path: str, workdir: str | None = None) -> dict[str, Any]:
    """Run (or continue) the experiment in `path` and write experiment.json and its report."""
    log = get_run_logger()
    exp = load_experiment(path, workdir)
    c = exp.config
    with RunLock(exp.workdir):
        arms = [a for a in exp.arm_order() if a in c.arms]
        for seed in c.seeds:
            for arm in arms:
                cfg = exp.runs[(arm, seed)]
                log.info("arm %s, seed %s: %s", arm, seed, cfg.workdir)
                with tags(f"experiment:{c.name}", f"arm:{arm}", f"seed:{seed}", f"run:{cfg.run_name}",
                          f"workdir:{workdir_id(cfg.workdir)}"):
                    distill.with_options(flow_run_name=cfg.run_name)(cfg)
        finals, bases, costs = {}, {}, {}
        for (arm, seed), cfg in exp.runs.items():
            finals[(arm, seed)], base, costs[(arm, seed)] = run_outcomes(cfg)
            bases.setdefault(seed, base)
        summary = summarize(exp, finals, bases, costs)
        json_path = write_experiment_json(exp, summary)
        md_path, html_path = write_report(exp.workdir, summary)
    create_markdown_artifact(
        key=artifact_key(f"{c.name}-experiment"),
        markdown=markdown(summary),
        description=f"{c.name}: arms vs {c.control}",
    )
    log.info("experiment %s: %s, %s", c.name, json_path, html_path)
    return {"summary": summary, "json": str(json_path), "markdown": str(md_path), "html": str(html_path)}


def run_experiment(path: str, workdir: str | None = None) -> dict[str, Any]:
    """The experiment flow named after the experiment (Prefect shows it in the UI's run list)."""
    exp = load_experiment(path, workdir)  # a bad file fails here, before Prefect starts
    RunLock(exp.workdir).acquire().release()
    return experiment.with_options(flow_run_name=exp.config.name)(str(path), workdir)
