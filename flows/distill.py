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
- artifacts: a table per round, a markdown accuracy curve, progress during model work.
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from stillhouse.flows.lifecycle import preflight, safe_point
from stillhouse.flows.monitoring import ProgressReporter, publish_report, publish_round
from stillhouse.flows.shards import sharded
from stillhouse.storage.catalog import CatalogLockedError
from stillhouse.storage.lock import RunLock
from stillhouse.tasks import steps
from stillhouse.tasks.config import RunConfig
from stillhouse.tasks.report import record_base, record_round
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
    @functools.wraps(fn)
    def step(*args, **kwargs):
        safe_point()  # a stop asked for while the previous step ran takes effect here
        return fn(*args, **kwargs)

    return task(
        step,
        name=fn.__name__.replace("_", "-"),
        tags=[GPU] if gpu else [],
        retries=retries,
        retry_delay_seconds=10,
        retry_condition_fn=_retry_condition if retries else None,
        cache_policy=NO_CACHE,
        persist_result=False,
    )


seed_problems = _step(steps.seed_problems, retries=2)
sample_teacher = _step(sharded(steps.sample_teacher, "sample"), gpu=True, retries=1)
verify_samples = _step(steps.verify_samples)
weigh_samples = _step(steps.weigh_samples)
commit_version = _step(steps.commit_version, retries=1)
train_student = _step(steps.train_student, gpu=True)
evaluate_base_student = _step(sharded(steps.evaluate_base, "evaluate"), gpu=True)
evaluate_student = _step(sharded(steps.evaluate, "evaluate"), gpu=True)
split_pool = _step(steps.split_pool)
synthesize_problems = _step(sharded(steps.synthesize_problems, "synthesize"), gpu=True, retries=1)


def _progress(cfg: RunConfig, round: int, what: str) -> ProgressReporter:
    return ProgressReporter(f"{cfg.run_name} r{round} {what}")


@flow(name="stillhouse-round", log_prints=False)
def distill_round(config: RunConfig, round: int, previous_adapter: StepResult | None = None,
                  base: StepResult | None = None) -> dict[str, Any]:
    """One round: the teacher's samples become a weighted, versioned dataset; the student trains on
    it; its results split the pool; the teacher writes the next round's new problems."""
    cfg, log = config, get_run_logger()
    started = time.monotonic()

    sampled = sample_teacher(cfg, round, _progress(cfg, round, "sample"))
    verified = verify_samples(cfg, round, sampled)
    weighted = weigh_samples(cfg, round, verified)
    # The round's record so far goes into the catalog with the version it describes.
    metrics: dict[str, Any] = {"round": round, **sampled.metrics, **verified.metrics, **weighted.metrics}
    version = commit_version(cfg, round, weighted, metrics)
    trained = train_student(cfg, round, version, previous_adapter, _progress(cfg, round, "train"))
    evaluated = evaluate_student(cfg, round, trained, base, _progress(cfg, round, "evaluate"))
    split = split_pool(cfg, round, evaluated)
    after_commit = [version, trained, evaluated, split]
    if cfg.synthesis.enabled and round + 1 < cfg.rounds:
        after_commit.append(
            synthesize_problems(cfg, round, evaluated, split, _progress(cfg, round, "synthesize"))
        )
    results = [sampled, verified, weighted, *after_commit]

    for r in after_commit:
        metrics.update(r.metrics)
    # Model work (loading models, generating, the training loop) of every step, replacing the
    # steps' own model_seconds: the rest of the round's wall time is orchestration, verification,
    # I/O and catalog writes.
    metrics["model_seconds"] = sum(r.metrics.get("model_seconds", 0.0) for r in results)
    metrics["wall_seconds"] = time.monotonic() - started
    metrics["steps_computed"] = [r.name for r in results if r.computed]
    metrics["adapter"] = trained.path
    record_round(cfg.workdir, round, metrics)
    publish_round(cfg.run_name, round, metrics)
    log.info(
        "round %d: teacher acc %.3f, student %s, easy %s / hard %s, new problems %s, recomputed %s",
        round, metrics["teacher_accuracy"], metrics.get("student_accuracy"), metrics.get("easy"),
        metrics.get("hard"), metrics.get("synth_kept", 0), metrics["steps_computed"] or "nothing",
    )
    return {"metrics": metrics, "adapter": trained}


@flow(name="stillhouse", log_prints=False)
def distill(config: RunConfig) -> list[dict[str, Any]]:
    """A multi-round run. Rerunning it on the same workdir continues where it stopped."""
    cfg, log = config, get_run_logger()
    Path(cfg.workdir).mkdir(parents=True, exist_ok=True)
    with RunLock(cfg.workdir):
        seeded = seed_problems(cfg)
        log.info("seed pool: %s", seeded.metrics)
        # The untrained student, once: the row every round's accuracy is read against.
        base = evaluate_base_student(cfg, ProgressReporter(f"{cfg.run_name} base evaluate"))
        record_base(cfg.workdir, base.metrics)
        log.info("untrained student: %s", base.metrics.get("student_accuracy"))
        history: list[dict[str, Any]] = []
        adapter: StepResult | None = None
        for r in range(cfg.rounds):
            out = distill_round.with_options(flow_run_name=f"{cfg.run_name}-round-{r}")(cfg, r, adapter, base)
            adapter = out["adapter"]
            history.append(out["metrics"])
        publish_report(cfg.run_name, history, base.metrics)
    return history


def run(config: RunConfig) -> list[dict[str, Any]]:
    """Run with a flow-run name of the run's name (Prefect shows it in the UI's run list)."""
    logging.getLogger("multilingual_gsm_symbolic").setLevel(logging.WARNING)
    # A missing source file or a workdir in use fails now, not after the flow has started.
    preflight(config)
    return distill.with_options(flow_run_name=config.run_name)(config)
