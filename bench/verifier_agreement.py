"""Agreement with a careful grader on the free-form table (issue 17): ours vs Math-Verify directly.

Reads tests/unit/verifier_freeform_cases.py (rows of reference, response, expected verdict, kind)
and, with --with-existing, the original behaviour table (tests/unit/verifier_cases.py). For each
verifier it prints agreement (verdict == label) and false positives (verdict True, label False),
and per-kind misses.

- ours:        stillhouse's score_samples (whichever `stillhouse` is importable: to measure an
               older verifier, put a checkout of it first on PYTHONPATH as a `stillhouse` folder).
- mathverify:  math_verify.verify(parse(reference), parse(response)) with Math-Verify's default
               configs and timeouts, the way reward functions usually call it.

Run: .venv/bin/python bench/verifier_agreement.py [--with-existing] [--show N] [--skip-mathverify]
Last line: agreement: n=... ours=... ours_fp=... mathverify=... mathverify_fp=...
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tests" / "unit" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load_rows(with_existing: bool) -> list[tuple[str, str, bool, str]]:
    rows = [(c.reference, c.response, c.correct, c.kind) for c in _load("verifier_freeform_cases").FREEFORM_CASES]
    if with_existing:
        rows += [(c.reference, c.response, c.correct, "existing") for c in _load("verifier_cases").CASES]
    return rows


def run_ours(rows) -> list[bool]:
    from stillhouse.tasks.verify.score import score_samples

    return [r.correct for r in score_samples([(resp, ref) for ref, resp, _, _ in rows], timeout_s=5.0)]


def run_math_verify(rows) -> list[bool]:
    from math_verify import parse, verify

    out = []
    for ref, resp, _, _ in rows:
        try:
            out.append(bool(verify(parse(ref), parse(resp))))
        except Exception:  # Math-Verify raises on a few pathological inputs of the existing table
            out.append(False)
    return out


def report(name: str, verdicts: list[bool], rows, show: int) -> tuple[int, int]:
    agree = sum(v == r[2] for v, r in zip(verdicts, rows))
    fps = [r for v, r in zip(verdicts, rows) if v and not r[2]]
    misses = Counter(r[3] for v, r in zip(verdicts, rows) if v != r[2])
    print(f"{name}: agreement {agree}/{len(rows)} false_positives={len(fps)} misses_by_kind={dict(misses)}")
    for v, r in [(v, r) for v, r in zip(verdicts, rows) if v != r[2]][:show]:
        print(f"   [{r[3]}] label={r[2]} got={v} ref={r[0][:70]!r} resp=...{r[1][-90:]!r}")
    return agree, len(fps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--with-existing", action="store_true", help="add the original behaviour table")
    parser.add_argument("--show", type=int, default=0, help="print the first N disagreements of each")
    parser.add_argument("--skip-mathverify", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.CRITICAL)  # Math-Verify logs every timeout and parse failure

    import stillhouse.tasks.verify.score as score_module

    rows = load_rows(args.with_existing)
    print(f"rows={len(rows)} positives={sum(r[2] for r in rows)} verifier={score_module.__file__}")
    ours, ours_fp = report("ours", run_ours(rows), rows, args.show)
    line = f"agreement: n={len(rows)} ours={ours} ours_fp={ours_fp}"
    if not args.skip_mathverify:
        mv, mv_fp = report("mathverify", run_math_verify(rows), rows, args.show)
        line += f" mathverify={mv} mathverify_fp={mv_fp}"
    print(line)


if __name__ == "__main__":
    main()
