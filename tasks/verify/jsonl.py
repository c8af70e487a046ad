"""`stillhouse verify`: score a JSONL file of {reference, response} rows into another JSONL file."""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from collections.abc import Callable
from dataclasses import field
from pathlib import Path
from typing import Any

from stillhouse.storage.parquet_io import write_bytes_atomic
from stillhouse.tasks.verify.score import VerifyInputError, VerifyItem, _as_pair, score_samples

# --------------------------------------------------------------------------- JSONL


def _row_error(row: dict[str, Any], message: str) -> dict[str, Any]:
    return {**row, "extracted": None, "correct": False, "reward": 0.0, "error": message}


# Python refuses to turn more than 4300 digits into an int (sys.int_info.str_digits_check_threshold)
# and json.loads raises for such a number. Keep long integer literals as their text instead: a
# 5,001-digit reference is then scored like any other (refused as too long, with a reason).
_MAX_INT_DIGITS = 4000


def _json_int(text: str) -> int | str:
    return int(text) if len(text) <= _MAX_INT_DIGITS else text


def _read_rows(path: Path) -> tuple[list[dict[str, Any]], list[tuple[int, VerifyItem]]]:
    """Output rows (bad ones already filled in) and (row position, item) for the good ones."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise VerifyInputError(f"cannot read verifier input {path}: {exc.strerror or exc}") from exc
    out: list[dict[str, Any]] = []
    todo: list[tuple[int, VerifyItem]] = []
    for lineno, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line.decode("utf-8"), parse_int=_json_int)
        except (ValueError, RecursionError) as exc:
            # ValueError covers UnicodeDecodeError and JSONDecodeError; RecursionError is JSON
            # nested thousands deep. One bad line costs its row, never the file.
            out.append(_row_error({"row": lineno}, f"row {lineno}: invalid JSON ({type(exc).__name__}: {exc})"[:500]))
            continue
        if not isinstance(row, dict):
            out.append(_row_error({"row": lineno}, f"row {lineno}: not a JSON object"))
            continue
        missing = [f for f in ("reference", "response") if f not in row or row[f] is None]
        if missing:
            fields = ", ".join(repr(f) for f in missing)
            out.append(_row_error(row, f"row {lineno}: missing field {fields}"))
            continue
        pair = _as_pair((row["response"], row["reference"]))
        if isinstance(pair, str):
            out.append(_row_error(row, f"row {lineno}: {pair}"))
            continue
        todo.append((len(out), VerifyItem(*pair)))
        out.append(row)
    return out, todo


def _write_jsonl_atomic(path: Path, rows: list[dict[str, Any]]) -> None:
    """Readers never see half a file (storage.parquet_io: temp file, fsync, rename)."""
    write_bytes_atomic("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8"), path)


def verify_jsonl(
    in_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    last_number_fallback: bool = True,
    timeout_s: float = 5.0,
    workers: int | None = None,
    reward_fn: Callable[[bool, bool], float] | None = None,
    verifier: Any = None,
) -> dict[str, Any]:
    """Score a JSONL file of {reference, response} rows; write each row plus extracted, correct,
    reward and error to out_path (atomically). Bad rows get an error naming the row and field
    and reward 0.0; the others are scored. Raises VerifyInputError if in_path cannot be read.

    reward_fn(correct, format_ok) -> float; default 1.0 / 0.0 on correctness.
    verifier: a VerifierConfig with rationale "pot" scores each response's program in the sandbox
    (tasks/verify/programs.py); its rows also say how the program ended (program_exit,
    program_signal, program_limit, program_stderr, program_output) and isolation_level.
    """
    started = time.monotonic()
    out_path = Path(out_path)
    rows, todo = _read_rows(Path(in_path))
    programs: list[Any] = [None] * len(todo)
    if verifier is not None and verifier.rationale == "pot":
        from stillhouse.tasks.verify.programs import score_programs

        verdicts = score_programs([item for _, item in todo], verifier)
        scores = [v.verdict for v in verdicts]
        programs = [v.program for v in verdicts]
    else:
        scores = score_samples(
            [item for _, item in todo],
            last_number_fallback=last_number_fallback,
            timeout_s=timeout_s,
            workers=workers,
        )
    for (pos, _), res, program in zip(todo, scores, programs, strict=True):
        if program is not None:
            rows[pos] = {**rows[pos], "program_exit": program.exit, "program_signal": program.signal,
                         "program_limit": program.limit, "program_stderr": program.stderr_tail,
                         "program_output": program.stdout, "isolation_level": program.level}
        reward = reward_fn(res.correct, res.format_ok) if reward_fn else float(res.correct)
        rows[pos] = {
            **rows[pos],
            "extracted": res.extracted,
            "correct": res.correct,
            "reward": float(reward),
            "error": res.error,
        }
    _write_jsonl_atomic(out_path, rows)
    n_correct = sum(r.correct for r in scores)
    return {
        "rows": len(rows),
        "scored": len(todo),
        "bad_rows": len(rows) - len(todo),
        "correct": n_correct,
        "accuracy": n_correct / len(todo) if todo else 0.0,
        "format_ok": sum(r.format_ok for r in scores),
        "errors": sum(1 for r in rows if r.get("error")),
        "seconds": round(time.monotonic() - started, 3),
        "output": str(out_path),
    }
