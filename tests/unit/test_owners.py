"""Concepts with one owner: the teacher's sampling parameters, solve requests, device/dtype, and the
runnable examples in the docstrings of the pure modules."""

from __future__ import annotations

import doctest
import importlib

import pytest

from stillhouse.tasks.backends.base import SamplingParams, derive_seed
from stillhouse.tasks.config import PromptsConfig, SamplingConfig
from stillhouse.tasks.problems import Problem
from stillhouse.tasks.prompts import solve_messages, solve_requests

pytestmark = pytest.mark.unit


def test_sampling_params_from_config():
    cfg = SamplingConfig(temperature=0.6, top_p=0.9, max_new_tokens=33, stop=["\n\n"])
    assert SamplingParams.from_config(cfg) == SamplingParams(0.6, 0.9, 33, ("\n\n",))


def test_solve_requests_seed_each_sample_from_its_scope():
    problems = [Problem.make("What is 2 + 2?", "4", "t"), Problem.make("What is 3 + 3?", "6", "t")]
    reqs = solve_requests(problems, 2, 5, PromptsConfig(), seed_scope="round-1/")
    assert [(r.key, r.sample_index) for r in reqs] == [(p.id, i) for p in problems for i in range(2)]
    assert [r.seed for r in reqs] == [derive_seed(5, f"round-1/{p.id}", i) for p in problems for i in range(2)]
    assert reqs[0].messages == solve_messages(problems[0].question, PromptsConfig())
    assert solve_requests(problems, 1, 5, PromptsConfig())[0].seed == derive_seed(5, problems[0].id, 0)


def test_dtype_float16_loads_for_generation_and_is_refused_for_training():
    import torch

    from stillhouse.tasks.models.resolve import resolve_device, resolve_dtype

    assert resolve_device("cpu") == "cpu"
    assert resolve_dtype("auto", "cpu") == torch.float32 and resolve_dtype("auto", "cuda:0") == torch.bfloat16
    assert resolve_dtype("float16", "cpu") == torch.float16
    assert resolve_dtype("bfloat16", "cpu", training=True) == torch.bfloat16
    with pytest.raises(ValueError, match="float16 needs a grad scaler"):
        resolve_dtype("float16", "cpu", training=True)
    with pytest.raises(ValueError, match="dtype must be"):
        resolve_dtype("int8", "cpu")


@pytest.mark.parametrize("module", [
    "stillhouse.tasks.verify.numbers",
    "stillhouse.tasks.synthesis.vote",
    "stillhouse.tasks.synthesis.dedup",
    "stillhouse.tasks.training.data",
    "stillhouse.tasks.weights",
    "stillhouse.tasks.evaluation",
    "stillhouse.tasks.redact",
    "stillhouse.tasks.bounded_yaml",
    "stillhouse.tasks.admission",
])
def test_docstring_examples_run(module):
    result = doctest.testmod(importlib.import_module(module))
    assert result.attempted and not result.failed
