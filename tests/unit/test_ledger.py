"""The cost ledger and the budget (issue 15): what a step cost is recorded once, by the invocation
that did the work; a budget stops before a teacher step that would pass it, never after."""

from __future__ import annotations

import pytest

from stillhouse.tasks.config import CostConfig, parse_config
from stillhouse.tasks.ledger import (
    BudgetExhausted, check_budget, estimate_teacher, read_ledger, record_step, round_costs, spent, teacher_cost,
)

pytestmark = pytest.mark.unit


def _cfg(tmp_path, **cost):
    return parse_config({
        "workdir": str(tmp_path), "problems": [{"kind": "arithmetic"}],
        "teacher": {"name_or_path": "tiny-tutor"}, "student": {"model": {"name_or_path": "tiny-tutor"}},
        "sampling": {"max_new_tokens": 50}, "cost": cost,
    })


SAMPLE = {"prompt_tokens": 1000, "completion_tokens": 3000, "requests": 40, "model_seconds": 12.5}


def test_an_output_found_complete_keeps_the_entry_of_the_work(tmp_path):
    cfg = _cfg(tmp_path, input_price_per_million=1.0, output_price_per_million=4.0)
    first = record_step(cfg, 0, "sample", "k1", True, SAMPLE)
    assert first["model_seconds"] == 12.5 and first["cost"] == pytest.approx((1000 * 1 + 3000 * 4) / 1e6)
    # A rerun that found the output complete reports 0 model seconds: the ledger keeps the work's.
    again = record_step(cfg, 0, "sample", "k1", False, {**SAMPLE, "model_seconds": 0.0})
    assert again == first and read_ledger(tmp_path)["0/sample"]["model_seconds"] == 12.5
    # Another output (a config change) is another cost: it replaces the entry.
    changed = record_step(cfg, 0, "sample", "k2", True, {**SAMPLE, "completion_tokens": 10})
    assert read_ledger(tmp_path)["0/sample"] == changed and changed["completion_tokens"] == 10


def test_round_totals_keep_teacher_and_student_apart(tmp_path):
    cfg = _cfg(tmp_path, output_price_per_million=2.0)
    record_step(cfg, 0, "sample", "a", True, SAMPLE)
    record_step(cfg, 0, "evaluate", "b", True, {"prompt_tokens": 7, "completion_tokens": 9, "model_seconds": 1.0})
    record_step(cfg, 0, "train", "c", True, {"train_tokens": 500, "model_seconds": 3.0})
    record_step(cfg, 1, "sample", "d", True, SAMPLE)
    record_step(cfg, None, "evaluate-base", "e", True, {"prompt_tokens": 1, "completion_tokens": 1})
    r0 = round_costs(read_ledger(tmp_path), 0)
    assert (r0["teacher_tokens_in"], r0["teacher_tokens_out"]) == (1000, 3000)
    assert (r0["student_tokens_in"], r0["student_tokens_out"], r0["train_tokens"]) == (7, 9, 500)
    assert r0["ledger_model_seconds"] == pytest.approx(16.5)
    assert r0["cost"] == pytest.approx(3000 * 2 / 1e6)  # the student's tokens are not billed
    assert spent(read_ledger(tmp_path)) == (8000, pytest.approx(2 * 3000 * 2 / 1e6))


def test_prices_are_per_million_tokens():
    prices = CostConfig(input_price_per_million=3.0, output_price_per_million=15.0)
    assert teacher_cost(1_000_000, 0, prices) == pytest.approx(3.0)
    assert teacher_cost(0, 2_000_000, prices) == pytest.approx(30.0)


def test_no_budget_never_stops(tmp_path):
    cfg = _cfg(tmp_path)
    record_step(cfg, 0, "sample", "a", True, {**SAMPLE, "completion_tokens": 10**9})
    check_budget(cfg, "sampling", 10**6)
    check_budget(cfg, "synthesis")


def test_a_step_that_would_pass_the_budget_is_not_started(tmp_path):
    cfg = _cfg(tmp_path, max_teacher_tokens=10_000)
    record_step(cfg, 0, "sample", "a", True, SAMPLE)  # 4000 spent, 100 tokens per request measured
    check_budget(cfg, "round 1's teacher sampling", 60)  # 4000 + 6000 = the budget: allowed
    with pytest.raises(BudgetExhausted, match="max_teacher_tokens = 10000: 4000 teacher tokens spent") as err:
        check_budget(cfg, "round 1's teacher sampling", 61)
    assert "rerun" in str(err.value) and "round 1's teacher sampling" in str(err.value)
    # Nothing left to generate (a resumed round whose shards are all done) never stops.
    check_budget(cfg, "round 0's teacher sampling", 0)


def test_a_step_of_unknown_size_stops_once_the_budget_is_spent(tmp_path):
    cfg = _cfg(tmp_path, max_teacher_tokens=4000)
    check_budget(cfg, "synthesis")  # nothing spent
    record_step(cfg, 0, "sample", "a", True, SAMPLE)  # exactly the budget
    with pytest.raises(BudgetExhausted, match="synthesis"):
        check_budget(cfg, "synthesis")


def test_money_budget(tmp_path):
    cfg = _cfg(tmp_path, input_price_per_million=1.0, output_price_per_million=1.0, max_cost=0.005)
    record_step(cfg, 0, "sample", "a", True, SAMPLE)  # 4000 tokens = 0.004
    check_budget(cfg, "sampling", 10)  # + 1000 tokens = 0.005
    with pytest.raises(BudgetExhausted, match="max_cost"):
        check_budget(cfg, "sampling", 11)


def test_estimate_without_history_is_an_upper_bound_on_completions():
    tokens, cost, how = estimate_teacher({}, 10, 50, CostConfig(output_price_per_million=1e6))
    assert tokens == 500 and cost == pytest.approx(500.0) and "max_new_tokens" in how


def test_money_budget_needs_a_price(tmp_path):
    with pytest.raises(ValueError, match="max_cost needs"):
        CostConfig(max_cost=1.0)
