"""The Stillhouse flows: a multi-round distillation run and the round it repeats.

A round reads top to bottom as the method (FDD + AdvDistill):

    sample -> verify -> weigh -> version -> train -> evaluate -> split -> synthesize

Each step is a Prefect task around a plain function of `stillhouse.tasks.steps`; tasks pass paths, ids
and content hashes (StepResult: an output's place and the step's metrics), never DataFrames or
models; data travels through the run's files and the catalog. Orchestration policy lives here:

- retries where there is I/O or a remote call (loading sources, teacher sampling, catalog commits,
  synthesis), and only for failures that can succeed later (`retryable`: network, I/O, a locked
  catalog); a bad config, a missing file or a refused change fails at once with its message;
- a stop asked for by Ctrl-C/SIGTERM (flows/lifecycle.py) is honoured between steps and at every
  progress update;
- GPU steps carry the tag `gpu`, so `prefect concurrency-limit create gpu 1` keeps two of them off
  one GPU;
- no Prefect result caching: resumption lives in the run's workdir (content-addressed Parquet
  outputs, adapter checkpoints, idempotent catalog writes), which survives a lost Prefect database
  and travels with the run directory;
- a step that found its output complete ends in a `Cached` state and says so in one log line;
- flow runs are named and tagged by run name, workdir id and round, so two runs of one name differ;
- artifacts: a Markdown page per round (dataset version, config hash, accuracies with n and
  interval against the untrained row, the pool's accounting, costs, plots, a link to the HTML
  report), the accuracy curve across rounds, progress during model work;
- a cost ledger per round and model step (tasks/ledger.py); with a budget set, a teacher step that
  would go past it is not started (BudgetExhausted, not retried; rerun after raising the budget).
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, tags, task
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed

from stillhouse.flows.lifecycle import preflight, safe_point, signal_lost_in
from stillhouse.flows.monitoring import ProgressReporter, publish_report, publish_round
from stillhouse.flows.shards import pooled_train, sharded
from stillhouse.storage.catalog import CatalogLockedError
from stillhouse.storage.lock import RunLock
from stillhouse.tasks import steps
from stillhouse.tasks.config import RunConfig
from stillhouse.tasks.ledger import ROLES, read_ledger, record_step, round_costs, spent
from stillhouse.tasks.report import build_report, record_base, record_round, round_summary
from stillhouse.tasks.run_view import (
    assemble_round, config_hash, history_markdown, report_plots, round_markdown, run_label, workdir_id,
)
from stillhouse.tasks.steps import StepResult

GPU = "gpu"


# Failures that a later attempt cannot fix: retrying them only delays the message.
_PERMANENT = (
    ValueError, TypeError, LookupError, AttributeError, NotImplementedError, AssertionError, ImportError,
    FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, FileExistsError,
)


def retryable(exc: BaseException | None) -> bool:
    """True for failures that can succeed later: a locked catalog, network and other I/O errors,
    a remote server that stayed down or overloaded; never for bad input (bad config, a missing
    file, a refused change to a committed round: ValueError and friends).

    >>> retryable(ConnectionResetError()), retryable(FileNotFoundError("x.jsonl")), retryable(ValueError())
    (True, False, False)
    """
    import httpx

    if exc is None or isinstance(exc, _PERMANENT):
        return False
    if isinstance(exc, CatalogLockedError):
        return True
    if getattr(exc, "transient", None) is not None:  # e.g. OpenAIBackendError
        return bool(exc.transient)
    return isinstance(exc, (OSError, httpx.TransportError))


def _retry_condition(task, task_run, state) -> bool:
    exc = state.data if isinstance(state.data, BaseException) else None
    if exc is None:
        try:
            exc = state.result(raise_on_failure=False)
        except Exception:
            exc = None
    ok = retryable(exc if isinstance(exc, BaseException) else None)
    if not ok:
        logging.getLogger(__name__).debug("%s: %r is not retried", task.name, exc)
    return ok


def _step(fn, *, gpu: bool = False, retries: int = 0):
    name = fn.__name__.replace("_", "-")

    def step(*args, **kwargs):
        safe_point()  # a stop asked for while the previous step ran takes effect here
        try:
            result = fn(*args, **kwargs)
        except Exception as err:
            stop = signal_lost_in(err)  # a signal during a catalog query: the stop, not a failure
            if stop is not None:
                raise stop from err
            raise
        if isinstance(result, StepResult) and result.name in ROLES:
            # Into the ledger as soon as the step ends: the budget check of the round's next
            # teacher step counts it. Steps take (config, round, ...); the base evaluation has no round.
            round = args[1] if len(args) > 1 and isinstance(args[1], int) else None
            record_step(args[0], round, result.name, result.key, result.computed, result.metrics)
        if isinstance(result, StepResult) and not result.computed:
            # Resumption is the workdir's (content-addressed outputs), not Prefect's cache; the UI
            # still shows it as what it is: a Cached state, and one line in the log.
            get_run_logger().info("%s: output found complete (%s); no work done", name,
                                  result.path or f"key {result.key[:12]}")
            return Completed(data=result, name="Cached", message="output found complete: no work done")
        return result

    run = task(
        functools.wraps(fn)(step),
        name=name,
        task_run_name=name,  # one run of each step per round flow: no random suffix needed
        tags=[GPU] if gpu else [],
        retries=retries,
        retry_delay_seconds=10,
        retry_condition_fn=_retry_condition if retries else None,
        cache_policy=NO_CACHE,
        persist_result=False,
    )

    def call(*args, **kwargs) -> Any:
        # A task that returns a State hands back the State when called directly: ask for the state
        # and unwrap it (a failure raises as before).
        return run(*args, return_state=True, **kwargs).result()

    call.task = run
    return call


seed_problems = _step(steps.seed_problems, retries=2)
sample_teacher = _step(sharded(steps.sample_teacher, "sample"), gpu=True, retries=1)
verify_samples = _step(steps.verify_samples)
weigh_samples = _step(steps.weigh_samples)
commit_version = _step(steps.commit_version, retries=1)
train_student = _step(pooled_train(steps.train_student), gpu=True)
evaluate_base_student = _step(sharded(steps.evaluate_base, "evaluate"), gpu=True)
evaluate_student = _step(sharded(steps.evaluate, "evaluate"), gpu=True)
split_pool = _step(steps.split_pool)
synthesize_problems = _step(sharded(steps.synthesize_problems, "synthesize"), gpu=True, retries=1)


def _progress(cfg: RunConfig, round: int, what: str) -> ProgressReporter:
    # Shown on the round flow run's page (cut after ~40 characters there): the run is known already.
    return ProgressReporter(f"round {round} {what}", unit="steps" if what == "train" else "samples")


def _write_report(cfg: RunConfig) -> tuple[str | None, dict[str, str]]:
    """The HTML report after each round (a link from the round's page) and its plots; a report
    that cannot be written is logged and costs the run nothing."""
    try:
        _, html_path = build_report(cfg.workdir, cfg.run_name)
    except Exception as err:  # the run's record is already written; the report is a view of it
        stop = signal_lost_in(err)  # ... but a stop that arrived during its queries is a stop
        if stop is not None:
            raise stop from err
        get_run_logger().warning("report not written: %s", err)
        return None, {}
    return str(html_path), report_plots(Path(html_path).parent)


@flow(name="stillhouse-round", log_prints=False)
def distill_round(config: RunConfig, round: int, previous_adapter: StepResult | None = None,
                  base: StepResult | None = None, history: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """One round: the teacher's samples become a weighted, versioned dataset; the student trains on
    it; its results split the pool; the teacher writes the next round's new problems."""
    cfg, log = config, get_run_logger()
    started = time.monotonic()
    history = history or []
    last_round = round + 1 >= cfg.rounds

    sampled = sample_teacher(cfg, round, _progress(cfg, round, "sample"))
    verified = verify_samples(cfg, round, sampled)
    weighted = weigh_samples(cfg, round, verified)
    # The round's record so far goes into the catalog with the version it describes.
    so_far = assemble_round(round, [sampled, verified, weighted], {}, 0.0, None, None, last_round)
    record = {k: so_far[k] for k in ("round", *sampled.metrics, *verified.metrics, *weighted.metrics)
              if k in so_far}
    version = commit_version(cfg, round, weighted, record)
    trained = train_student(cfg, round, version, previous_adapter, _progress(cfg, round, "train"))
    evaluated = evaluate_student(cfg, round, trained, base, _progress(cfg, round, "evaluate"))
    split = split_pool(cfg, round, evaluated)
    results = [sampled, verified, weighted, version, trained, evaluated, split]
    if cfg.synthesis.enabled and not last_round:
        results.append(synthesize_problems(cfg, round, evaluated, split, _progress(cfg, round, "synthesize")))

    metrics = assemble_round(
        round, results, round_costs(read_ledger(cfg.workdir), round), time.monotonic() - started,
        previous_summary=round_summary(cfg.workdir, round),
        previous_round=next((h for h in history if h["round"] == round - 1), None),
        last_round=last_round,
        extra={"adapter": trained.path, "config_hash": config_hash(cfg), "run_name": cfg.run_name,
               "run": run_label(cfg.run_name, cfg.workdir)},
    )
    record_round(cfg.workdir, round, metrics)
    html, plots = _write_report(cfg)
    label = run_label(cfg.run_name, cfg.workdir)
    publish_round(label, round_markdown(cfg.run_name, label, metrics, history, base.metrics if base else None,
                                        cfg.rounds, html, plots), round)
    done = ", ".join(metrics["steps_computed"]) or "none (every output found complete)"
    log.info(
        "round %d (snapshot %s): teacher acc %.3f; student %s; easy/mid/hard %s/%s/%s of %s; new problems %s; "
        "steps that did work: %s",
        round, metrics.get("snapshot"), metrics["teacher_accuracy"],
        ", ".join(f"{s} {a:.3f} (n={(metrics.get('eval_counts') or {}).get(s)})"
                  for s, a in (metrics.get("student_accuracy") or {}).items()) or "-",
        metrics.get("easy"), metrics.get("mid"), metrics.get("hard"), metrics.get("pool"),
        "- (last round)" if last_round else metrics.get("synth_kept", 0), done,
    )
    return {"metrics": metrics, "adapter": trained}


@flow(name="stillhouse", log_prints=False)
def distill(config: RunConfig) -> list[dict[str, Any]]:
    """A multi-round run. Rerunning it on the same workdir continues where it stopped."""
    cfg, log = config, get_run_logger()
    label = run_label(cfg.run_name, cfg.workdir)
    Path(cfg.workdir).mkdir(parents=True, exist_ok=True)
    with RunLock(cfg.workdir):
        log.info("run %s: workdir %s, config %s, %d rounds", label, Path(cfg.workdir).resolve(),
                 config_hash(cfg), cfg.rounds)
        seeded = seed_problems(cfg)
        s = seeded.metrics
        log.info("seed pool: %d problems (%d train, %d eval); %d new in the catalog, %d source rows "
                 "skipped, %d quarantined", s["problems"], s["train"], s["eval"], s["added"],
                 s["skipped_rows"], s["quarantined"])
        # The untrained student, once: the row every round's accuracy is read against.
        base = evaluate_base_student(cfg, ProgressReporter("untrained student evaluate", unit="samples"))
        record_base(cfg.workdir, base.metrics)
        log.info("untrained student: %s", ", ".join(
            f"{k} {v:.3f}" for k, v in (base.metrics.get("student_accuracy") or {}).items()) or "-")
        history: list[dict[str, Any]] = []
        adapter: StepResult | None = None
        for r in range(cfg.rounds):
            with tags(f"round:{r}"):
                out = distill_round.with_options(flow_run_name=f"{label}-round-{r}")(cfg, r, adapter, base, history)
            adapter = out["adapter"]
            history.append(out["metrics"])
        html, plots = _write_report(cfg)
        publish_report(label, history_markdown(cfg.run_name, label, history, base.metrics, html, plots))
        spent_tokens, spent_cost = spent(read_ledger(cfg.workdir))
        log.info("finished %d rounds: %s; teacher tokens %d, cost %.4f; report: %s", len(history),
                 "; ".join(f"round {m['round']} student {m.get('student_overall') or 0:.3f}" for m in history),
                 spent_tokens, spent_cost, html or "not written")
    return history


def run(config: RunConfig) -> list[dict[str, Any]]:
    """Run with a flow-run name of the run's name and workdir id, tagged with both (the UI's run
    list tells two runs of one name apart, and filters by tag)."""
    logging.getLogger("multilingual_gsm_symbolic").setLevel(logging.WARNING)
    # A missing source file or a workdir in use fails now, not after the flow has started.
    preflight(config)
    with tags(f"run:{config.run_name}", f"workdir:{workdir_id(config.workdir)}"):
        return distill.with_options(flow_run_name=run_label(config.run_name, config.workdir))(config)
