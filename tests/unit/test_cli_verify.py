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


def test_a_5001_digit_number_costs_its_row_not_the_command(tmp_path):
    """Issue 16: json.loads raised ValueError (Python's 4300-digit int limit) and the whole command
    stopped with no output. Now the row is scored with a reason and the others go on."""
    src = tmp_path / "gen.jsonl"
    src.write_text(
        '{"reference": ' + "9" * 5001 + ', "response": "The answer is 5"}\n'
        '{"reference": "5", "response": "The answer is ' + "9" * 5001 + '"}\n'
        '{"reference": "7", "response": "#### 7"}\n'
        + "[" * 100_000  # nested too deep for json: RecursionError, its row only
        + "\n"
    )
    out = tmp_path / "scored.jsonl"
    proc = _run("verify", str(src), "--out", str(out), "--workers", "1")
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["correct"] for r in rows] == [False, False, True, False]
    assert "longer than" in rows[0]["error"] and "longer than" in rows[1]["error"]
    assert rows[3]["error"].startswith("row 4: invalid JSON")


@pytest.mark.parametrize("value", ["-5", "0", "nan", "inf", "five"])
def test_timeout_must_be_a_positive_finite_number(tmp_path, value):
    src = tmp_path / "gen.jsonl"
    src.write_text('{"reference": "7", "response": "#### 7"}\n')
    proc = _run("verify", str(src), "--out", str(tmp_path / "o.jsonl"), f"--timeout={value}")
    assert proc.returncode == 2
    assert "--timeout" in proc.stderr
    assert not (tmp_path / "o.jsonl").exists()


def test_hostile_answers_from_issue_16(tmp_path):
    """Model output is hostile text: code-shaped answers, a box that never closes, and values
    too large to compute are all wrong, each with a reason (the huge ones refused by the
    pre-screen, not timed out)."""
    rows = [
        {"reference": "1", "response": "The answer is $(foo: 1)()$"},
        {"reference": "1", "response": "The answer is $(\uff4c\uff41\uff4d\uff42\uff44\uff41: 1)()$"},
        {"reference": "42", "response": "The answer is \\boxed{42"},
        {"reference": "1", "response": "The answer is $(10)^{(10)^{(10)}}$"},
        {"reference": "1", "response": "The answer is $10^{9}!$"},
        {"reference": "1", "response": "The answer is $\\binom{10^9}{10^5}$"},
        {"reference": "1", "response": "The answer is $\\Gamma(10^8)$"},
    ]
    src = tmp_path / "gen.jsonl"
    src.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    out = tmp_path / "scored.jsonl"
    proc = _run("verify", str(src), "--out", str(out), "--workers", "1", "--timeout", "30")
    assert proc.returncode == 0, proc.stderr
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["correct"] for r in got] == [False] * 7
    assert [r["reward"] for r in got] == [0.0] * 7  # no format bonus either
    assert all("refused" in r["error"] for r in got[3:]), [r["error"] for r in got]
    assert "program code" in got[0]["error"] and "program code" in got[1]["error"]
    assert "unclosed" in got[2]["error"]
