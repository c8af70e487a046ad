"""Storage benchmark: committing a round of 1M samples to DuckLake vs writing the same Parquet.

(a) Catalog.add_samples(table) + commit_round(0) into a fresh catalog (validation, in-batch dedupe,
    the idempotency check, the Parquet write with fsync, registration, both commits).
(b) pyarrow.parquet.write_table of the same Arrow table, with DuckLake's default file settings
    (snappy, 122,880-row row groups; the settings of the files DuckLake wrote are printed), no fsync.
Both run --repeat times, interleaved; the best wall time of each is reported (the box is shared).
Then a round diff (change feed) between round 0 and a round 1 that adds synthesized problems and
their samples.

Data is deterministic (seed 0): 125,000 problems x 8 samples; the prompt (~300 chars) is shared by
a problem's 8 samples as in real sampling, responses (~800 chars) are distinct slices of a Zipfian
random-word corpus so they compress like text, not like repeats.

Usage: python bench/storage.py [--rows 1000000] [--repeat 2] [--no-bulk] [--workdir DIR] [--keep]
The LAST line is: storage: rows=... commit_s=... parquet_s=... ratio=... diff_s=...
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stillhouse.storage.catalog import Catalog  # noqa: E402

SAMPLES_PER_PROBLEM = 8


def _corpus(rng: np.random.Generator, n_words: int) -> bytes:
    """Random words with a Zipf-like frequency, plus digits and math tokens: text-like entropy."""
    vocab = [
        "".join(chr(97 + c) for c in rng.integers(0, 26, rng.integers(1, 10)))
        for _ in range(20_000)
    ]
    vocab += list("0123456789") + ["=", "+", "-", "\\frac", "####", "\n", "Therefore,", "answer"]
    p = 1.0 / np.arange(1, len(vocab) + 1) ** 1.1
    words = rng.choice(len(vocab), size=n_words, p=p / p.sum())
    return " ".join(np.array(vocab, dtype=object)[words].tolist()).encode()


def _text(rng: np.random.Generator, n: int, mean: int, sd: int, corpus: bytes) -> pa.Array:
    """n strings of ~mean chars, each a slice of the corpus at a random offset, built as one buffer."""
    lens = np.clip(rng.normal(mean, sd, n), mean // 4, mean * 3).astype(np.int64)
    offs = rng.integers(0, len(corpus) - int(lens.max()) - 1, n)
    data = b"".join(
        [corpus[o : o + ln] for o, ln in zip(offs.tolist(), lens.tolist(), strict=True)]
    )
    offsets = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(lens, out=offsets[1:])
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(data))


def make_samples(
    n_rows: int, round_: int, seed: int, corpus: bytes, problem_prefix: str = "p"
) -> pa.Table:
    rng = np.random.default_rng(seed)
    n_prob = -(-n_rows // SAMPLES_PER_PROBLEM)
    idx = np.arange(n_rows)
    prob = idx // SAMPLES_PER_PROBLEM
    k = idx % SAMPLES_PER_PROBLEM
    pid = np.char.add(problem_prefix, np.char.zfill(prob.astype(str), 7))
    prompts = _text(rng, n_prob, 300, 60, corpus).take(pa.array(prob))
    correct = rng.random(n_rows) < 0.6
    reward = correct.astype(np.float64)
    # Group-relative advantage, as the weigh stage computes it.
    g = reward.reshape(-1, SAMPLES_PER_PROBLEM) if n_rows % SAMPLES_PER_PROBLEM == 0 else None
    adv = (
        ((g - g.mean(1, keepdims=True)) / (g.std(1, keepdims=True) + 1e-6)).ravel()
        if g is not None
        else reward
    )
    comp_tokens = rng.integers(50, 400, n_rows)
    finish = np.where(comp_tokens > 390, "length", "stop")
    return pa.table(
        {
            "sample_id": pa.array(np.char.add(np.char.add(pid, f"-r{round_}-"), k.astype(str))),
            "problem_id": pa.array(pid),
            "round": pa.array(np.full(n_rows, round_, dtype=np.int64)),
            "sample_index": pa.array(k.astype(np.int64)),
            "teacher": pa.array(np.full(n_rows, "Qwen/Qwen2.5-7B-Instruct")),
            "prompt": prompts,
            "response": _text(rng, n_rows, 800, 250, corpus),
            "extracted": pa.array(rng.integers(0, 1000, n_rows).astype(str)),
            "correct": pa.array(correct),
            "format_ok": pa.array(rng.random(n_rows) < 0.95),
            "reward": pa.array(reward),
            "advantage": pa.array(adv),
            "weight": pa.array(np.maximum(adv, 0.0)),
            "error": pa.nulls(n_rows, pa.string()),
            "sampling_params": pa.array(
                np.full(n_rows, '{"max_new_tokens":512,"temperature":0.7,"top_p":1.0}')
            ),
            "prompt_tokens": pa.array(rng.integers(60, 120, n_rows)),
            "completion_tokens": pa.array(comp_tokens),
            "finish_reason": pa.array(finish),
        }
    )


def make_problems(ids: list[str], round_: int, parents: list[str] | None) -> list[dict]:
    return [
        {
            "problem_id": pid,
            "question": f"question {pid}",
            "answer": str(i),
            "source": "bench",
            "split": "train",
            "parent_id": parents[i] if parents else None,
            "operation": ("harder" if i % 2 else "similar") if parents else "seed",
            "round_introduced": round_,
        }
        for i, pid in enumerate(ids)
    ]


def ducklake_file_settings(cat: Catalog) -> str:
    """Compression and row-group size of the Parquet files DuckLake wrote for samples."""
    files = cat.con.execute(
        "SELECT data_file FROM ducklake_list_files('lake', 'samples')"
    ).fetchall()
    md = pq.ParquetFile(files[0][0]).metadata
    codec = md.row_group(0).column(0).compression
    return f"{len(files)} file(s), codec={codec}, row_groups={md.num_row_groups}, rows/rg={md.row_group(0).num_rows}"


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def time_parquet(table: pa.Table, path: Path) -> tuple[float, float]:
    """(wall, cpu) seconds of the raw write, with DuckLake's defaults: snappy, 122,880-row groups."""
    gc.collect()
    c0, t0 = _cpu(), time.perf_counter()
    pq.write_table(table, path, compression="snappy", row_group_size=122_880)
    return time.perf_counter() - t0, _cpu() - c0


def time_commit(cat: Catalog, table: pa.Table) -> tuple[float, float]:
    """(wall, cpu) seconds of add_samples + commit_round of round 0 into a fresh catalog."""
    gc.collect()
    c0, t0 = _cpu(), time.perf_counter()
    n = cat.add_samples(table)
    cat.commit_round(0, {"rows": n}, config_hash="bench")
    wall, cpu = time.perf_counter() - t0, _cpu() - c0
    assert n == table.num_rows, n
    return wall, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument(
        "--round1-rows", type=int, default=200_000, help="samples added in round 1 (for the diff)"
    )
    ap.add_argument(
        "--repeat", type=int, default=2, help="runs of (b) then (a); the best of each is reported"
    )
    ap.add_argument(
        "--no-bulk", action="store_true", help="force the plain INSERT path (DuckDB's writer)"
    )
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cat_kw = {"bulk_rows": 0} if args.no_bulk else {}

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-storage-"))
    work.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    corpus = _corpus(np.random.default_rng(0), 12_000_000)
    table = make_samples(args.rows, 0, seed=1, corpus=corpus)
    print(
        f"generated {table.num_rows} rows, {table.nbytes / 1e9:.2f} GB in Arrow, {time.perf_counter() - t:.1f}s"
    )
    seeds = sorted(set(table["problem_id"].to_pylist()))

    try:
        # Interleave (b) and (a) so load from other processes hits both alike; keep the best.
        parquet, commit = [], []
        for rep in range(args.repeat):
            parquet.append(time_parquet(table, work / "raw.parquet"))
            shutil.rmtree(work / "run", ignore_errors=True)
            with Catalog(work / "run", **cat_kw) as cat:
                cat.add_problems(make_problems(seeds, 0, None))
                commit.append(time_commit(cat, table))
            print(
                f"rep {rep}: parquet wall {parquet[-1][0]:.2f}s cpu {parquet[-1][1]:.2f}s | "
                f"ducklake wall {commit[-1][0]:.2f}s cpu {commit[-1][1]:.2f}s"
            )
        parquet_s, commit_s = min(w for w, _ in parquet), min(w for w, _ in commit)
        parquet_cpu, commit_cpu = min(c for _, c in parquet), min(c for _, c in commit)
        raw_mb = (work / "raw.parquet").stat().st_size / 1e6
        size = sum(f.stat().st_size for f in (work / "run" / "catalog" / "data").rglob("*.parquet"))

        with Catalog(work / "run", **cat_kw) as cat:
            print(
                f"parquet {raw_mb:.0f} MB; ducklake {size / 1e6:.0f} MB, {ducklake_file_settings(cat)}"
            )
            # Round 1: synthesized children of the first problems, with their samples.
            del table
            gc.collect()
            r1 = make_samples(args.round1_rows, 1, seed=2, corpus=corpus, problem_prefix="c")
            kids = sorted(set(r1["problem_id"].to_pylist()))
            cat.add_problems(make_problems(kids, 1, seeds[: len(kids)]))
            t = time.perf_counter()
            cat.add_samples(r1)
            r1_s = time.perf_counter() - t
            cat.commit_round(1, {}, config_hash="bench")
            print(f"round 1: add_samples of {r1.num_rows} rows into a non-empty table {r1_s:.2f}s")

            t = time.perf_counter()
            d = cat.diff(0, 1)
            diff_s = time.perf_counter() - t
            assert len(d.problems_added) == len(kids) and d.samples_added_by_round == {
                1: r1.num_rows
            }, d
            print(
                f"diff(0,1): {len(d.problems_added)} problems added {d.added_by_operation}, "
                f"samples {d.samples_added_by_round}"
            )
            # The alternative: set difference of the two versions by time travel (for comparison).
            t = time.perf_counter()
            sa, sb = d.from_snapshot, d.to_snapshot
            added = cat.con.execute(
                f"SELECT problem_id FROM lake.problems AT (VERSION => {sb}) EXCEPT "
                f"SELECT problem_id FROM lake.problems AT (VERSION => {sa})"
            ).fetchall()
            cat.con.execute(
                f"SELECT round, count(*) FROM (SELECT sample_id, round FROM lake.samples AT (VERSION => {sb}) "
                f"EXCEPT SELECT sample_id, round FROM lake.samples AT (VERSION => {sa})) GROUP BY 1"
            ).fetchall()
            assert len(added) == len(kids)
            print(f"diff by time-travel set difference instead: {time.perf_counter() - t:.3f}s")
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
        print(
            f"peak RSS {rss:.1f} GB; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; "
            f"cpu ratio {commit_cpu / parquet_cpu:.2f} (commit {commit_cpu:.2f}s, parquet {parquet_cpu:.2f}s)"
        )
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    ratio = commit_s / parquet_s
    print(
        f"storage: rows={args.rows} commit_s={commit_s:.2f} parquet_s={parquet_s:.2f} "
        f"ratio={ratio:.2f} diff_s={diff_s:.3f}"
    )


if __name__ == "__main__":
    main()
