"""A round's record and its page (issue 15): counts that add up, costs that survive a rerun,
tables that render as tables, and a run's identity that tells two runs of one name apart."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import pytest
from markdown_it import MarkdownIt

from stillhouse.tasks.run_view import (
    assemble_round, change_text, history_markdown, round_markdown, run_label, workdir_id,
)

pytestmark = pytest.mark.unit


@dataclass
class R:
    name: str
    computed: bool
    metrics: dict[str, Any] = field(default_factory=dict)


def _results(computed: bool) -> list[R]:
    return [
        R("sample", computed, {"pool": 27, "samples": 108, "generated": 108 if computed else 0,
                               "prompt_tokens": 900, "completion_tokens": 2000, "requests": 108}),
        R("verify", computed, {"teacher_accuracy": 0.4}),
        R("evaluate", computed, {"student_overall": 0.5, "eval_total": 4, "student_accuracy": {"a": 0.5},
                                 "eval_counts": {"a": 4}, "prompt_tokens": 11, "completion_tokens": 22}),
        R("split", computed, {"easy": 10, "mid": 1, "hard": 16}),
    ]


COSTS = {"teacher_tokens_out": 2000, "student_tokens_out": 22, "ledger_model_seconds": 80.0, "cost": 0.0}


def test_a_rerun_keeps_what_the_round_cost():
    first = assemble_round(1, _results(True), COSTS, 95.0, None, {"round": 0, "pool": 16, "snapshot": 4}, False)
    assert first["model_seconds"] == 80.0 and first["wall_seconds"] == 95.0 and first["generated"] == 108
    rerun = assemble_round(1, _results(False), COSTS, 2.0, first, {"round": 0, "pool": 16, "snapshot": 4}, False)
    assert rerun["steps_computed"] == [] and rerun["steps_found_complete"] == ["sample", "verify", "evaluate", "split"]
    assert (rerun["model_seconds"], rerun["wall_seconds"], rerun["generated"]) == (80.0, 95.0, 108)
    assert rerun["rerun_wall_seconds"] == 2.0
    # A resumed round that did part of the work reports this invocation's wall time.
    part = [*_results(False)[:2], *_results(True)[2:]]
    resumed = assemble_round(1, part, COSTS, 30.0, first, {"round": 0, "pool": 16}, False)
    assert resumed["wall_seconds"] == 30.0 and resumed["generated"] == 108 and "rerun_wall_seconds" not in resumed


def test_token_counts_of_different_steps_do_not_overwrite_each_other():
    m = assemble_round(1, _results(True), COSTS, 1.0, None, None, False)
    # the teacher's and the student's tokens are separate totals from the ledger, not the last step's
    assert "prompt_tokens" not in m and "completion_tokens" not in m
    assert (m["teacher_tokens_out"], m["student_tokens_out"]) == (2000, 22)


def test_pool_accounting():
    m = assemble_round(1, _results(True), COSTS, 1.0, None, {"round": 0, "pool": 16, "snapshot": 4}, False)
    assert m["pool_added"] == 27 - 16 and m["previous_snapshot"] == 4
    assert assemble_round(0, _results(True), COSTS, 1.0, None, None, False)["pool_added"] is None


def _tables(md: str) -> list[list[int]]:
    """Cell counts per row of every table a CommonMark+GFM-tables parser finds."""
    tokens = MarkdownIt("commonmark").enable("table").parse(md)
    tables, rows, cells = [], None, 0
    for t in tokens:
        if t.type == "table_open":
            rows = []
        elif t.type == "tr_open":
            cells = 0
        elif t.type in ("th_open", "td_open"):
            cells += 1
        elif t.type == "tr_close":
            rows.append(cells)
        elif t.type == "table_close":
            tables.append(rows)
    return tables


def _round(**over) -> dict[str, Any]:
    m = assemble_round(1, _results(True), COSTS, 95.0, None, {"round": 0, "pool": 16, "snapshot": 4}, True)
    return {**m, "snapshot": 7, "config_hash": "abc123def456", "mean_abs_weight": 0.39,
            "synth_dropped": {"duplicate": 1, "no_answer": 0}, **over}


def test_round_page_tables_render_with_every_cell():
    base = {"student_accuracy": {"a": 0.25}, "eval_counts": {"a": 4}, "student_overall": 0.25, "eval_total": 4}
    history = [{**_round(), "round": 0, "last_round": False}]
    md = round_markdown("smoke | test", "smoke-abc123", _round(), history, base, rounds_total=2,
                        plots={"accuracy": "AAAA"})
    tables = _tables(md)
    assert len(tables) == 4  # accuracy, pool, teacher and training, cost
    for rows in tables:
        assert len(set(rows)) == 1, rows  # every row as wide as its header: pipes escaped
    assert "mean \\|weight\\|" in md and "smoke \\| test" in md
    assert "snapshot 7" in md and "previous round 0: snapshot 4" in md and "abc123def456" in md
    assert "10 / 1 / 16 (= 27 of 27)" in md and "+11" in md
    assert "last round" in md  # no synthesis in the last round, and the page says why
    assert "![accuracy](data:image/png;base64,AAAA)" in md
    curve = history_markdown("smoke", "smoke-abc123", [*history, _round()], base)
    assert [len(set(rows)) for rows in _tables(curve)] == [1]


def test_a_change_inside_the_intervals_is_not_called_a_change():
    a = {"student_overall": 0.5, "eval_total": 4}
    b = {"student_overall": 0.75, "eval_total": 4}
    assert "no measured change" in change_text(b, a, "round 0")
    c = {"student_overall": 0.1, "eval_total": 500}
    d = {"student_overall": 0.9, "eval_total": 500}
    text = change_text(d, c, "round 0")
    assert text.startswith("+0.800") and "outside both 95% intervals" in text
    assert change_text(a, None, "round 0") is None


def test_two_runs_of_one_name_have_different_labels(tmp_path, monkeypatch):
    assert run_label("smoke", tmp_path / "a") != run_label("smoke", tmp_path / "b")
    monkeypatch.chdir(tmp_path)
    # one directory, however it is spelled, is one run
    assert workdir_id("a") == workdir_id(tmp_path / "a") == workdir_id(f".{os.sep}a")


def test_shards_on_a_work_pool_are_counted_on_the_round_page():
    plain = round_markdown("smoke", "smoke-abc123", _round(), [], None, rounds_total=2)
    assert "Shards on the work pool" not in plain  # in process: no shard table
    pooled = _round(sample_shards_total=4, sample_shards_reused=1, sample_shards_done=3,
                    sample_shards_failed=1, sample_shards_resubmitted=1,
                    train_shards_total=1, train_shards_reused=0, train_shards_done=1,
                    train_shards_failed=0, train_shards_resubmitted=0)
    md = round_markdown("smoke", "smoke-abc123", pooled, [], None, rounds_total=2)
    assert "| sample | 4 | 1 | 3 | 1 | 1 |" in md
    assert "| train | 1 | 0 | 1 | 0 | 0 |" in md  # the training as one job on the pool
    assert all(len(set(rows)) == 1 for rows in _tables(md))
