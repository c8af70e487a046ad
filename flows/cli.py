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
    from tasks.config import RewardConfig
    from tasks.verifier import verify_jsonl
    from tasks.weights import sample_reward

    rewards = RewardConfig()
    summary = verify_jsonl(
        args.input,
        args.out,
        last_number_fallback=not args.no_fallback,
        timeout_s=args.timeout,
        workers=args.workers,
        reward_fn=lambda correct, format_ok: sample_reward(correct, format_ok, rewards),
    )
    print(json.dumps(summary))
    return 0


def _cmd_models_prepare(args: argparse.Namespace) -> int:
    from tasks.models import prepare_model

    path = prepare_model(args.name, Path(args.out))
    print(path)
    return 0


def _cmd_models_tiny(args: argparse.Namespace) -> int:
    from tasks.models import build_tiny_model

    path = build_tiny_model(Path(args.out), seed=args.seed)
    print(path)
    return 0


def _prefect_env() -> None:
    """Telemetry off by default: these machines have no network, and users did not ask for it."""
    import os

    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def _cmd_run(args: argparse.Namespace) -> int:
    import os

    from tasks.config import load_config

    cfg = load_config(args.config, workdir=args.workdir, rounds=args.rounds)
    _prefect_env()
    from flows.distill import run

    import time

    started = time.monotonic()
    history = run(cfg)
    wall = time.monotonic() - started
    model = sum(m.get("model_seconds", 0.0) for m in history)
    from tasks.report import build_report

    md, html_path = build_report(cfg.workdir, cfg.run_name)
    where = os.environ.get("PREFECT_API_URL") or "ephemeral server (run `stillhouse ui` for the UI)"
    print(f"rounds:  {len(history)} finished")
    for m in history:
        print(f"  round {m['round']}: teacher acc {m['teacher_accuracy']:.3f}, student {m.get('student_accuracy')}, "
              f"easy {m.get('easy')} / hard {m.get('hard')}, new problems {m.get('synth_kept', 0)}")
    print(f"time:    {wall:.1f}s wall, {model:.1f}s model work ({100 * (1 - model / wall):.1f}% outside model "
          f"work: Prefect, verification, I/O, catalog)")
    print(f"catalog: {Path(cfg.workdir).resolve() / 'catalog'}")
    print(f"report:  {html_path.resolve()}")
    print(f"prefect: {where}")
    return 0


def _open_catalog(workdir: str):
    from storage.catalog import Catalog

    if not (Path(workdir) / "catalog").is_dir():
        raise FileNotFoundError(f"{workdir} holds no Stillhouse catalog (no catalog/ folder)")
    return Catalog(workdir, read_only=True)


def _cmd_status(args: argparse.Namespace) -> int:
    from tasks.report import round_summaries

    with _open_catalog(args.workdir) as cat:
        status = cat.status()
    done = {m["round"]: m for m in round_summaries(args.workdir)}
    print(f"{status.workdir}  (current snapshot {status.current_snapshot})")
    print(f"{'round':>5}  {'status':<10} {'version':>7} {'problems':>8} {'samples':>8}  steps")
    for r in status.rounds:
        m = done.get(r.round)
        steps = "complete" if m else "in progress"
        print(f"{r.round:>5}  {r.status:<10} {r.snapshot_id if r.snapshot_id is not None else '-':>7} "
              f"{r.problems:>8} {r.samples:>8}  {steps}")
    return 0


def _cmd_diff(args: argparse.Namespace) -> int:
    import dataclasses

    with _open_catalog(args.workdir) as cat:
        d = cat.diff(args.a, args.b)
    print(json.dumps(dataclasses.asdict(d), indent=2, default=str))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    with _open_catalog(args.workdir) as cat:
        n = cat.export(args.round, args.out)
    print(f"wrote {n} rows of round {args.round} to {args.out}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from tasks.report import build_report

    md, html_path = build_report(args.workdir)
    print(md)
    print(html_path)
    return 0


def _cmd_ui(args: argparse.Namespace) -> int:
    import os
    import subprocess

    _prefect_env()
    url = f"http://127.0.0.1:{args.port}"
    print(f"Prefect UI: {url}")
    print("  Runs made without a server (Prefect's ephemeral mode) are stored in $PREFECT_HOME/prefect.db")
    print(f"  and show up here. To watch a run live, start it with PREFECT_API_URL={url}/api")
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(args.port)]
    return subprocess.call(cmd, env=os.environ.copy())


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

    p = sub.add_parser("status", help="Rounds, versions and steps of a run directory.")
    p.add_argument("workdir")
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
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("report", help="Write the run report (Markdown + HTML with plots).")
    p.add_argument("workdir")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("ui", help="Start the Prefect server and UI on 127.0.0.1.")
    p.add_argument("--port", type=int, default=4200)
    p.set_defaults(func=_cmd_ui)

    p = sub.add_parser("verify", help="Score existing generations (JSONL with reference, response).")
    p.add_argument("input", help="Input JSONL: one object per line with `reference` and `response`.")
    p.add_argument("--out", required=True, help="Output JSONL: input + extracted, correct, reward, error.")
    p.add_argument("--timeout", type=float, default=5.0, help="Seconds per row (default 5).")
    p.add_argument("--workers", type=int, default=None, help="Worker processes (default: all cores).")
    p.add_argument("--no-fallback", action="store_true", help="Do not fall back to the last number.")
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
    from storage.catalog import CatalogError
    from storage.lock import RunLockedError

    try:
        return args.func(args)
    except (OSError, ValueError, RunLockedError, CatalogError) as err:
        # Expected user errors (unreadable file, bad config): one clear line, non-zero exit.
        print(f"stillhouse: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
