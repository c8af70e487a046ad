"""The entry flow of deployments and `stillhouse serve`: one scheduled tick of a distillation run.

A schedule fires the same parameters again and again, so each tick has to decide what the run
still needs:

- mode "continue": every tick works on the same workdir. It runs the rounds that are missing, or
  only the next `rounds_per_run` of them (a nightly schedule that adds one round a night), up to
  the config's `rounds`. A run whose rounds are all complete is a no-op that says so in the log.
- mode "dated": every tick starts a run of its own, in `<workdir>-<date>` named
  `<run_name>-<date>` (the date of the tick's scheduled start, UTC, in `date_format`). A second
  tick on the same date continues that day's run like mode "continue".

The rounds themselves are `stillhouse.flows.distill.distill`, called as a subflow unchanged: it takes the
workdir lock, and its resumable steps make a repeated round free. Ticks of one deployment never
overlap because the deployment carries a concurrency limit of 1 (deployment/prefect.yaml): a tick
that fires while the previous one still runs waits (ENQUEUE) or is cancelled (CANCEL_NEW) by the
Prefect server, which logs why. Another process holding the workdir (a manual `stillhouse run`)
is outside that limit; such a tick is skipped with a warning instead of failing.
"""

from __future__ import annotations

import logging
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger

from stillhouse.flows.distill import distill
from stillhouse.storage.catalog import Catalog
from stillhouse.storage.lock import RunLock, RunLockedError
from stillhouse.tasks.config import ConfigError, RunConfig, load_config, parse_config
from stillhouse.tasks.report import round_summaries

Mode = Literal["continue", "dated"]


def resolve_config(config: RunConfig | str | dict[str, Any], overrides: dict[str, Any] | None = None) -> RunConfig:
    """The run config from a deployment's parameters: a config, or the path of a YAML config
    (relative paths are relative to the flow run's working directory), with top-level
    `overrides` (workdir, rounds, run_name, ...) winning over it, as on `stillhouse run`."""
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    if isinstance(config, str):
        return load_config(config, **overrides)
    data = config.model_dump(mode="json") if isinstance(config, RunConfig) else dict(config)
    data.update(overrides)
    return parse_config(data, origin="deployment parameters")


def dated_config(cfg: RunConfig, when: datetime, date_format: str = "%Y-%m-%d") -> RunConfig:
    """The config of the run that a tick at `when` starts in mode "dated"."""
    stamp = when.astimezone(UTC).strftime(date_format)
    # The stamp becomes part of a folder name: a format with a separator would nest folders.
    if not stamp or os.sep in stamp or stamp in (".", ".."):
        raise ConfigError(f"date_format {date_format!r} gives {stamp!r}, which cannot be a folder name suffix")
    workdir = str(cfg.workdir).rstrip("/" + os.sep)
    return cfg.model_copy(update={"workdir": f"{workdir}-{stamp}", "run_name": f"{cfg.run_name}-{stamp}"})


def completed_rounds(workdir: str | Path) -> int:
    """How many rounds, counted from round 0, are complete in `workdir`.

    A round is complete when the catalog holds it as committed and its summary
    (`rounds/round-<r>.json`) exists: the round flow writes the summary after its last step, so a
    committed round whose training or evaluation was cut off does not count.
    """
    workdir = Path(workdir)
    if not (workdir / "catalog").is_dir():
        return 0
    summaries = {m["round"] for m in round_summaries(workdir)}
    with Catalog.for_workdir(workdir, read_only=True) as cat:
        committed = {r.round for r in cat.status().rounds if r.status == "committed"}
    done = 0
    while done in summaries and done in committed:
        done += 1
    return done


def _tick_time() -> datetime:
    """When this tick was scheduled to start (a manual run: when it was created)."""
    from prefect.runtime import flow_run

    when = flow_run.scheduled_start_time
    return when if isinstance(when, datetime) else datetime.now(UTC)


@flow(name="stillhouse-scheduled", log_prints=False)
def scheduled_distill(
    config: RunConfig | str,
    overrides: dict[str, Any] | None = None,
    mode: Mode = "continue",
    rounds_per_run: int | None = None,
    date_format: str = "%Y-%m-%d",
) -> dict[str, Any]:
    """One scheduled tick of a distillation run: continue the run (mode "continue") or start a
    run of its own named after the date (mode "dated"), up to the config's `rounds`.

    Args:
        config: A run config, or the path of a YAML run config (see configs/).
        overrides: Top-level config fields that win over the config's (workdir, rounds, ...).
        mode: "continue" works on the config's workdir on every tick; "dated" on
            `<workdir>-<date>` with run name `<run_name>-<date>`.
        rounds_per_run: Rounds a tick adds at most (None = all that are missing).
        date_format: strftime format of the date suffix in mode "dated" (UTC).
    """
    log = get_run_logger()
    logging.getLogger("multilingual_gsm_symbolic").setLevel(logging.WARNING)
    if rounds_per_run is not None and rounds_per_run < 1:
        raise ConfigError(f"rounds_per_run must be at least 1 (got {rounds_per_run})")
    cfg = resolve_config(config, overrides)
    if mode == "dated":
        cfg = dated_config(cfg, _tick_time(), date_format)
    summary: dict[str, Any] = {"run_name": cfg.run_name, "workdir": str(cfg.workdir), "rounds": cfg.rounds}

    # The lock is only probed here, then released: distill takes it for the whole run. A holder
    # found now is a run outside this deployment (the deployment's own ticks never overlap).
    try:
        RunLock(cfg.workdir).acquire().release()
    except RunLockedError as err:
        log.warning("skipped: %s", err)
        return {**summary, "action": "skipped", "reason": str(err)}

    done = completed_rounds(cfg.workdir)
    summary["completed_before"] = done
    if done >= cfg.rounds:
        log.info(
            "run %s in %s has already finished: all %d rounds are complete, nothing to do "
            "(raise `rounds` to extend it)", cfg.run_name, cfg.workdir, cfg.rounds,
        )
        return {**summary, "action": "finished", "completed_after": done}

    target = cfg.rounds if rounds_per_run is None else min(cfg.rounds, done + rounds_per_run)
    log.info(
        "run %s in %s (%s mode): %d of %d rounds complete, running to round %d",
        cfg.run_name, cfg.workdir, mode, done, cfg.rounds, target - 1,
    )
    # `rounds` shapes no step's cache key, so a run grown one round per tick ends with the same
    # versions as one run of all rounds; the last round of each tick writes its new problems on
    # the next tick, when the following round needs them.
    history = distill.with_options(flow_run_name=cfg.run_name)(cfg.model_copy(update={"rounds": target}))
    return {**summary, "action": "ran", "completed_after": len(history)}
