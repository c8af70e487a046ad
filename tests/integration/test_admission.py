"""Inputs that would poison a workdir (issue 16, finding 3), with a real tiny model and catalog.

A problem whose prompt does not fit the model's context used to reach sampling, which tried to
allocate attention for it and crashed naming no row; since the problem stays in the catalog's
pool, every resume crashed the same way. Now the seed step (and each round's sample step)
quarantines it, with the reason, and the run goes on with the rest.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from stillhouse.storage.catalog import Catalog
from stillhouse.tasks import steps
from stillhouse.tasks.config import parse_config
from stillhouse.tasks.problems import Problem

pytestmark = pytest.mark.integration


def _config(tmp_path, model_dir, source):
    return parse_config({
        "run_name": "poisoned",
        "workdir": str(tmp_path / "run"),
        "problems": [{"kind": "jsonl", "path": str(source)}],
        "teacher": {"name_or_path": str(model_dir), "dtype": "float32", "device": "cpu"},
        "student": {"model": {"name_or_path": str(model_dir), "dtype": "float32", "device": "cpu"}},
        "sampling": {"n": 2, "max_new_tokens": 8, "batch_size": 4},
        "evaluation": {"max_new_tokens": 8},
        "verifier": {"workers": 0},
    })


def test_a_poisoned_pool_row_is_quarantined_with_its_reason_and_the_round_goes_on(tmp_path, tiny_model_dir):
    source = tmp_path / "problems.jsonl"
    rows = [{"question": f"What is {a} + {b}?", "answer": str(a + b)} for a, b in [(1, 2), (3, 4), (5, 6)]]
    # Under max_question_chars (8,000) but ~4,000 tokens for the tiny tokenizer: over its 2,048 context.
    long_question = "Add these: " + " + ".join(["7 9"] * 1300) + ". What is the total?"
    rows.append({"question": long_question, "answer": "1"})
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = _config(tmp_path, tiny_model_dir, source)
    # A 1 MB question already in the catalog (from a run before any limit): removing it from the
    # source does not remove it from the pool.
    poisoned = Problem.make("How many? " + "x " * 500_000, "3", "earlier", split="train")
    with Catalog(cfg.workdir) as cat:
        cat.add_problems([poisoned.to_row()])

    seeded = steps.seed_problems(cfg)
    assert seeded.metrics["quarantined"] == 2
    with Catalog(cfg.workdir, read_only=True) as cat:
        quarantined = cat.quarantined()
        pool, _ = steps.pool_and_eval(cat, 0)
    long_id = Problem.make(long_question, "1", "problems").id
    assert set(quarantined) == {poisoned.id, long_id}
    assert quarantined[poisoned.id]["reason"] == "prompt_too_long"
    assert "cannot fit context 2,048" in quarantined[poisoned.id]["detail"]
    assert "tokens + 8 new > context 2,048" in quarantined[long_id]["detail"]
    assert sorted(p.question for p in pool) == sorted(r["question"] for r in rows[:3])

    # The round's model work runs on the rest (real sampling with the tiny model).
    sampled = steps.sample_teacher(cfg, 0)
    assert sampled.metrics["pool"] == 3 and sampled.metrics["samples"] == 6

    # Visible to the user: `stillhouse status` lists the quarantined problems and why.
    proc = subprocess.run([sys.executable, "-m", "stillhouse.flows.cli", "status", cfg.workdir],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "quarantined: 2 problem(s)" in proc.stdout and poisoned.id in proc.stdout

    # A resume finds them quarantined already: nothing new, same pool.
    assert steps.seed_problems(cfg).metrics["quarantined"] == 0


def test_sources_with_no_usable_problem_fail_at_once_naming_them(tmp_path, tiny_model_dir):
    source = tmp_path / "bad.jsonl"
    source.write_text('{"question": "What is 1+1?", "answer": ""}\n{"question": "x"}\nnot json\n')
    cfg = _config(tmp_path, tiny_model_dir, source)
    with pytest.raises(ValueError, match=r"0 training problems: source 'bad' \(jsonl .*bad.jsonl\): "
                                         r"0 train / 0 eval problems, 3 rows skipped \(first: row 1 answer: empty\)"):
        steps.check_sources(cfg)
    with pytest.raises(ValueError, match="0 training problems: source 'bad'"):
        steps.seed_problems(cfg)  # the same inside a run (e.g. a scheduled tick)
