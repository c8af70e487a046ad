"""`stillhouse verify`: the user-facing scorer for existing generations, run as a real process."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit


def _run(*args):
    return subprocess.run([sys.executable, "-m", "stillhouse.flows.cli", *args], capture_output=True, text=True, timeout=120)


def test_verify_scores_rows_and_reports_bad_ones(tmp_path):
    src = tmp_path / "gen.jsonl"
    rows = [
        {"reference": "72", "response": "She sold 48 + 24 = 72 clips.\n#### 72", "id": "a"},
        {"reference": "\\frac{1}{2}", "response": "So the answer is \\boxed{0.5}.", "id": "b"},
        {"reference": "5", "response": "The answer is 500."},
        {"response": "no reference here #### 3"},
    ]
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n")
    out = tmp_path / "scored.jsonl"
    proc = _run("verify", str(src), "--out", str(out), "--workers", "1")
    assert proc.returncode == 0, proc.stderr
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(got) == 5
    assert got[0]["id"] == "a" and got[0]["correct"] is True and got[0]["extracted"] == "72"
    assert got[0]["reward"] == pytest.approx(1.1)  # correct + format reward (defaults)
    assert got[1]["correct"] is True and got[1]["error"] is None
    # "The answer is" is an explicit format, but the format bonus goes to correct answers only.
    assert got[2]["correct"] is False and got[2]["reward"] == 0.0
    assert got[3]["correct"] is False and "reference" in got[3]["error"]
    assert got[4]["correct"] is False and "5" in got[4]["error"]  # the bad line names its row


def test_unreadable_input_exits_nonzero_with_a_clear_message(tmp_path):
    proc = _run("verify", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o.jsonl"))
    assert proc.returncode != 0
    assert "missing.jsonl" in proc.stderr
    assert not (tmp_path / "o.jsonl").exists()
