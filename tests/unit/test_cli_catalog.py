"""The catalog commands on awkward requests (issue 16, finding 9): rounds that have no version,
`--out` onto an existing file, a damaged round summary. Run as a user runs them: real processes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from stillhouse.storage.catalog import Catalog, RoundNotCommittedError

pytestmark = pytest.mark.unit


def _problem(pid: str) -> dict:
    return {"problem_id": pid, "question": f"What is {pid}?", "answer": "2", "source": "unit", "split": "train",
            "parent_id": None, "operation": "seed", "round_introduced": 0, "meta": None}


def _sample(pid: str, k: int) -> dict:
    return {"sample_id": f"{pid}/r0/{k}/t", "problem_id": pid, "round": 0, "sample_index": k, "teacher": "t",
            "prompt": "p", "response": "#### 2", "extracted": "2", "correct": True, "format_ok": True,
            "reward": 1.0, "advantage": 0.0, "weight": 1.0, "error": None, "sampling_params": {},
            "prompt_tokens": 1, "completion_tokens": 1, "finish_reason": "stop"}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """Round 0 committed; round 1 has samples but no version yet (a run stopped mid-round)."""
    wd = tmp_path_factory.mktemp("cli") / "run"
    with Catalog(wd) as cat:
        cat.add_problems([_problem("a"), _problem("b")])
        cat.add_samples([_sample(p, k) for p in "ab" for k in range(2)])
        cat.commit_round(0, {}, config_hash="cfg")
        cat.add_samples([{**_sample("a", 5), "sample_id": "a/r1/0/t", "round": 1}])
    (wd / "rounds").mkdir()
    (wd / "rounds" / "round-0.json").write_text(json.dumps({"round": 0, "teacher_accuracy": 1.0}))
    return wd


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stillhouse.flows.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "args, message",
    [
        (("diff", "{w}", "0", "1"), "round 1 is not committed (it has no committed version yet; committed: [0])"),
        (("diff", "{w}", "-1", "0"), "round -1 is not committed (rounds are numbered from 0"),
        (("export", "{w}", "--round", "1", "--out", "{tmp}/r1.parquet"), "round 1 is not committed"),
        (("export", "{w}", "--round", "-3", "--out", "{tmp}/r.jsonl"), "rounds are numbered from 0"),
    ],
)
def test_rounds_without_a_version_give_one_clear_line(workdir, tmp_path, args, message):
    proc = _cli(*(a.format(w=workdir, tmp=tmp_path) for a in args))
    assert proc.returncode == 2
    assert proc.stderr.startswith("stillhouse: error: ") and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.iterdir())  # no file, not even a temp one


def test_round_not_committed_is_still_a_key_error_for_library_callers(workdir):
    with Catalog(workdir, read_only=True) as cat, pytest.raises(KeyError):
        cat.training_set(1)
    assert issubclass(RoundNotCommittedError, KeyError)


def test_out_onto_an_existing_file_needs_force(workdir, tmp_path):
    out = tmp_path / "r0.parquet"
    out.write_bytes(b"precious")
    proc = _cli("export", workdir, "--round", "0", "--out", out)
    assert proc.returncode == 2 and "already exists; pass --force" in proc.stderr
    assert out.read_bytes() == b"precious"
    proc = _cli("export", workdir, "--round", "0", "--out", out, "--force")
    assert proc.returncode == 0, proc.stderr
    assert pq.read_table(out).num_rows == 4

    scored = tmp_path / "scored.jsonl"
    scored.write_text("precious\n")
    src = tmp_path / "gen.jsonl"
    src.write_text('{"reference": "7", "response": "#### 7"}\n')
    proc = _cli("verify", src, "--out", scored, "--workers", "0")
    assert proc.returncode == 2 and "already exists; pass --force" in proc.stderr
    assert scored.read_text() == "precious\n"
    assert _cli("verify", src, "--out", scored, "--workers", "0", "--force").returncode == 0
    assert json.loads(scored.read_text())["correct"] is True


def test_a_truncated_round_summary_is_named(workdir, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(workdir, copy)
    summary = copy / "rounds" / "round-0.json"
    summary.write_text(summary.read_text()[:10])
    for command in ("status", "report"):
        proc = _cli(command, copy)
        assert proc.returncode == 2, proc.stderr
        assert f"round summary {summary} is not valid JSON" in proc.stderr
        assert "Traceback" not in proc.stderr
