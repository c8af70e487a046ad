"""The comparison of a round's greedy eval answers with the untrained student's."""

import pyarrow as pa
import pytest

from stillhouse.storage import parquet_io
from stillhouse.tasks.steps import StepResult, same_answers_as_base

pytestmark = pytest.mark.unit


def _eval_output(tmp_path, name, answers, pool=()):
    rows = [{"round": 0, "student_key": "k", "eval_set": "arith", "problem_id": pid, "sample_index": 0,
             "response": text, "extracted": None, "correct": False} for pid, text in answers.items()]
    rows += [{"round": 0, "student_key": "k", "eval_set": "pool", "problem_id": pid, "sample_index": 0,
              "response": "x", "extracted": None, "correct": False} for pid in pool]

    def compute(out):
        parquet_io.write_parquet_atomic(pa.Table.from_pylist(rows), out / "eval.parquet")
        return {}

    out, _ = parquet_io.cached_output(tmp_path, name, parquet_io.content_hash(name), compute)
    return StepResult(name, name, str(out))


def test_share_of_identical_greedy_answers(tmp_path):
    base = _eval_output(tmp_path, "base", {"a": "= 6", "b": "= 8", "c": "= 1", "d": "= 2"}, pool=["p"])
    same = _eval_output(tmp_path, "same", {"a": "= 6", "b": "= 8", "c": "= 1", "d": "= 2"}, pool=["p", "q"])
    moved = _eval_output(tmp_path, "moved", {"a": "= 6", "b": "= 9", "c": "= 1", "d": "= 3"})
    assert same_answers_as_base(same, base) == 1.0  # pool rows do not count
    assert same_answers_as_base(moved, base) == 0.5
    assert same_answers_as_base(_eval_output(tmp_path, "none", {}), base) is None
