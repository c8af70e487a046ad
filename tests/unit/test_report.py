"""The run report's Markdown renders as tables (every row has the header's cell count) and its HTML
holds real <table>s, whatever text the cells carry."""

from __future__ import annotations

import doctest

import pytest
from markdown_it import MarkdownIt

import stillhouse.tasks.report as report
from stillhouse.tasks.report import _dropped_markdown, _markdown, markdown_html, run_name_of

pytestmark = pytest.mark.unit

HISTORY = [
    {"round": 0, "pool": 16, "samples": 64, "teacher_accuracy": 0.390625, "zero_weight_group_share": 0.75,
     "mean_abs_weight": 0.11243965, "train_loss": 312.69581, "student_overall": 0.5, "eval_total": 4,
     "pool_mean_pass_rate": 0.40625, "easy": 6, "mid": 1, "hard": 9, "synth_generated": 15, "synth_kept": 11,
     "synth_dropped": {"no_agreement": 4, "duplicate_pool": 0}},
    {"round": 1, "pool": 27, "samples": 108, "teacher_accuracy": 0.5648, "student_overall": 0.75,
     "eval_total": 4, "easy": 15, "mid": 1, "hard": 11},
]
BASE = {"student_overall": 0.25, "eval_total": 4}
# A drop's detail quotes the teacher's text: pipes, a line break and markup must not break the table.
DROPPED = [{"round": 0, "parent_id": "06b7d1cd", "operation": "harder", "reason": "no_agreement",
            "detail": "answers 3 | 4\nand <script>alert(1)</script>"}]


def _tables(md: str) -> list[list[int]]:
    """Cells per row of every table markdown-it finds (header row first)."""
    tables, row = [], 0
    for tok in MarkdownIt("commonmark").enable("table").parse(md):
        if tok.type == "table_open":
            tables.append([])
        elif tok.type == "tr_open":
            row = 0
        elif tok.type in ("th_open", "td_open"):
            row += 1
        elif tok.type == "tr_close":
            tables[-1].append(row)
    return tables


def test_every_row_of_the_report_has_the_headers_cell_count():
    md = _markdown("smoke", HISTORY, BASE) + _dropped_markdown(DROPPED)
    tables = _tables(md)
    assert len(tables) == 3  # rounds, drops per round, dropped problems
    for rows in tables:
        assert len(set(rows)) == 1, rows
    # Every table line of the text is a parsed row: none fell out of its table.
    assert sum(len(rows) for rows in tables) == sum(1 for line in md.splitlines() if line.startswith("|")) - 3
    rounds = tables[0]
    assert len(rounds) == 1 + 1 + len(HISTORY)  # header, base, one per round
    assert rounds[0] == 1 + len(report.REPORT_COLUMNS)


def test_numbers_share_one_precision_and_drops_read_as_words():
    md = _markdown("smoke", HISTORY, BASE)
    assert "| 0.391 |" in md and "| 312.696 |" in md and "0.3906" not in md
    assert "| 0 | no agreement | 4 |" in md and "duplicate" not in md  # zero counts left out
    assert "Round 1 is the last" in md


def test_html_report_has_real_tables_with_the_round_rows_and_escapes_model_text():
    page = markdown_html(_markdown("smoke", HISTORY, BASE) + _dropped_markdown(DROPPED))
    assert page.count("<table>") == 3 and "<pre>" not in page
    assert "<td>0.391</td>" in page and "<td>0.565</td>" in page
    assert "<td>base (untrained)</td>" in page
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "answers 3 | 4 and" in page


def test_run_name_comes_from_the_round_summaries_else_the_folder(tmp_path):
    assert run_name_of(tmp_path, [{"round": 0}]) == tmp_path.name
    assert run_name_of(tmp_path, [{"round": 0, "run_name": "nightly"}]) == "nightly"


def test_docstring_examples_run():
    result = doctest.testmod(report)
    assert result.attempted and not result.failed
