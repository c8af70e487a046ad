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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stillhouse",
        description="Feedback-driven, reward-weighted multi-round distillation of math reasoning.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="Debug logging.")
    sub = parser.add_subparsers(dest="command", required=True)

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
    try:
        return args.func(args)
    except (OSError, ValueError) as err:
        # Expected user errors (unreadable file, bad config): one clear line, non-zero exit.
        print(f"stillhouse: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
