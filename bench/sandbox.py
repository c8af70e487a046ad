"""PoT sandbox throughput: programs/s through the warm SandboxPool vs a bare subprocess per program.

The same programs (small PoT-style arithmetic programs, as a teacher writes them), the same
machine, one run: first `subprocess.run([python, "-c", code])` per program (no isolation at all),
then the sandbox pool at the highest isolation level this machine offers, with the default limits.
Both sides run `--workers` programs at a time; the pool's time includes starting its workers.

    python bench/sandbox.py
    python bench/sandbox.py --programs 400 --workers 2

Last line: `speedup=<pool programs/s / bare programs/s> level=<isolation level> ...`.
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stillhouse.tasks.config import SandboxConfig  # noqa: E402
from stillhouse.tasks.sandbox.isolation import detect  # noqa: E402
from stillhouse.tasks.sandbox.pool import SandboxPool  # noqa: E402


def programs(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """(program, expected output) pairs shaped like PoT answers."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b, c = rng.randint(1, 99), rng.randint(1, 99), rng.randint(1, 9)
        code = f"apples = {a}\nbought = {b}\nboxes = {c}\ntotal = (apples + bought) * boxes\nprint(total)\n"
        out.append((code, f"{(a + b) * c}\n"))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--programs", type=int, default=300)
    ap.add_argument("--workers", type=int, default=2, help="programs at a time, both sides")
    args = ap.parse_args(argv)

    progs = programs(args.programs)
    iso = detect()
    python = iso.python  # the same interpreter binary on both sides

    def timed(flags: list[str]) -> tuple[list[str], float]:
        def one(code: str) -> str:
            return subprocess.run([python, *flags, "-c", code], capture_output=True, text=True,
                                  timeout=30).stdout

        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.workers) as ex:
            out = list(ex.map(one, [c for c, _ in progs]))
        return out, time.perf_counter() - t0

    bare_out, bare_s = timed([])
    # A second, stricter baseline: the interpreter without site-packages (-I -S) starts faster.
    bare_is_out, bare_is_s = timed(["-I", "-S"])

    t0 = time.perf_counter()
    with SandboxPool(SandboxConfig(workers=args.workers, min_level=iso.level), iso) as pool:
        started_s = time.perf_counter() - t0
        results = pool.run_many([c for c, _ in progs])
    pool_s = time.perf_counter() - t0

    expected = [e for _, e in progs]
    assert bare_out == expected == bare_is_out, "bare subprocess gave wrong outputs"
    assert [r.stdout for r in results] == expected, "sandbox gave wrong outputs"
    bare_rate, pool_rate = len(progs) / bare_s, len(progs) / pool_s
    print(f"bare subprocess.run([python, '-c', code]): {len(progs)} programs in {bare_s:.2f} s "
          f"= {bare_rate:.1f} programs/s (no isolation)")
    print(f"bare subprocess.run([python, '-I', '-S', '-c', code]): {bare_is_s:.2f} s "
          f"= {len(progs) / bare_is_s:.1f} programs/s")
    print(f"sandbox pool (level {iso.level}, {args.workers} workers, start {started_s:.2f} s): "
          f"{len(progs)} programs in {pool_s:.2f} s = {pool_rate:.1f} programs/s")
    print(f"speedup={pool_rate / bare_rate:.2f} level={iso.level} programs={len(progs)} "
          f"workers={args.workers} pool_per_s={pool_rate:.1f} bare_per_s={bare_rate:.1f} "
          f"speedup_vs_bare_isolated={pool_rate * bare_is_s / len(progs):.2f}")


if __name__ == "__main__":
    main()
