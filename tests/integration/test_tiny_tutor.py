"""tiny-tutor (stillhouse.tasks.models.tiny_tutor): the tiny Llama briefly trained so that smoke runs see signal.

What the flow tests need from it, checked here with the DEFAULT prompts (PromptsConfig) through its
chat template and the hf backend:

- solve prompts on simple word problems, N=4 at T=0.7: sample accuracy strictly between 0 and 1,
  some groups with mixed rewards (non-zero advantages), answers in a format the verifier reads;
- harder / similar prompts: "Problem: ..." replies that stillhouse.tasks.synthesis.parse.parse_generated_problem
  accepts for most parents, and a full `synthesize` call that keeps some problems;
- a deterministic, idempotent build published like the other prepared names.

One full build per session (about half a minute on a quiet 2-core machine; the build time is in
the manifest). Set STILLHOUSE_TEST_MODELS_DIR to keep it between sessions.
"""

from __future__ import annotations

import json
import shutil

import pytest

from stillhouse.tasks.config import PromptsConfig, SamplingConfig, SynthesisConfig, VerifierConfig
from stillhouse.tasks.models.prepared import PREPARED_NAMES
from stillhouse.tasks.models.publish import MANIFEST
from stillhouse.tasks.models.resolve import resolve_model
from stillhouse.tasks.models.tiny_tutor import TUTOR_NAME
from stillhouse.tasks.problems import Problem
from stillhouse.tasks.models.tiny_tutor import build_tiny_tutor

pytestmark = pytest.mark.integration

# Simple word problems in phrasings of their own (not the tutor's training templates), operands
# 2..10 like the `arithmetic` source's defaults.
SIMPLE = [
    ("Tom has 5 apples. He buys 3 more apples. How many apples does Tom have now?", "8"),
    ("A basket has 9 oranges. Mia eats 4 of them. How many oranges are left?", "5"),
    ("Liam has 7 red balls and 6 blue balls. How many balls does he have in total?", "13"),
    ("There are 9 birds on a tree. 5 more birds land on the tree. How many birds are on the tree now?", "14"),
    ("Sara had 10 candies. She gave 8 candies to her friend. How many candies does Sara have left?", "2"),
    ("Ann has 6 stickers and Ben has 9 stickers. How many stickers do they have together?", "15"),
    ("Noah has 10 marbles. He loses 3 marbles. How many marbles does Noah have now?", "7"),
    ("Max has 2 toy cars. His dad gives him 6 more toy cars. How many toy cars does Max have now?", "8"),
]
# A longer GSM8K-style parent: the tutor must still answer the write prompts with a problem.
STORY = (
    "Lucas is selling cupcakes for a fundraiser. On Monday he sold 26 boxes of cupcakes and on "
    "Tuesday he sold 13 more boxes than on Monday. Each box costs $9. How much money did Lucas earn?",
    "351",
)
N = 4


@pytest.fixture(scope="session")
def tutor(tutor_dir):
    from stillhouse.tasks.backends.hf import HFBackend

    with HFBackend(tutor_dir, batch_size=16, device="cpu") as backend:
        yield backend


def _problems(items, source="test"):
    return [Problem.make(q, a, source) for q, a in items]


def test_tutor_folder_and_manifest(tutor_dir):
    names = {p.name for p in tutor_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", MANIFEST} <= names
    config = json.loads((tutor_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and config["head_dim"] == 64
    manifest = json.loads((tutor_dir / MANIFEST).read_text())
    assert manifest["name"] == TUTOR_NAME and manifest["spec"]["kind"] == TUTOR_NAME
    assert manifest["build_seconds"] > 0 and manifest["loss_last"] < manifest["loss_first"]


def test_prepared_name_resolves_to_a_built_folder(tmp_path, tutor_dir):
    assert TUTOR_NAME in PREPARED_NAMES
    shutil.copytree(tutor_dir, tmp_path / TUTOR_NAME)
    stamp = (tmp_path / TUTOR_NAME / "model.safetensors").stat().st_mtime_ns
    assert resolve_model(TUTOR_NAME, tmp_path) == str(tmp_path / TUTOR_NAME)
    # The manifest's spec matches the default build: returned as is, nothing retrained.
    assert (tmp_path / TUTOR_NAME / "model.safetensors").stat().st_mtime_ns == stamp


def test_build_is_deterministic_and_idempotent(tmp_path):
    small = dict(steps=6, n_solve=40, n_write=8, n_drill=8)
    a = build_tiny_tutor(tmp_path / "a", seed=0, **small)
    b = build_tiny_tutor(tmp_path / "b", seed=0, **small)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    c = build_tiny_tutor(tmp_path / "c", seed=1, **small)
    assert (c / "model.safetensors").read_bytes() != (a / "model.safetensors").read_bytes()
    stamp = (a / "model.safetensors").stat().st_mtime_ns
    assert build_tiny_tutor(a, seed=0, **small) == a  # same spec: nothing rebuilt
    assert (a / "model.safetensors").stat().st_mtime_ns == stamp
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left


@pytest.mark.slow
def test_full_build_is_deterministic(tmp_path, tutor_dir):
    again = build_tiny_tutor(tmp_path / TUTOR_NAME)
    assert (again / "model.safetensors").read_bytes() == (tutor_dir / "model.safetensors").read_bytes()


def test_solves_simple_problems_sometimes(tutor):
    from stillhouse.tasks.backends.base import SamplingParams
    from stillhouse.tasks.prompts import solve_requests
    from stillhouse.tasks.verify.score import score_samples

    problems = _problems(SIMPLE)
    sampling = SamplingConfig(n=N, temperature=0.7, max_new_tokens=48)
    completions = tutor.sample(solve_requests(problems, N, sampling.seed, PromptsConfig()),
                               SamplingParams.from_config(sampling))
    refs = [p.answer for p in problems for _ in range(N)]
    results = score_samples([(c.text, r) for c, r in zip(completions, refs, strict=True)], workers=0)
    correct = [r.correct for r in results]
    assert 0 < sum(correct) < len(correct), [c.text for c in completions]
    assert sum(r.format_ok for r in results) >= 0.75 * len(results), [c.text for c in completions]
    per_problem = [sum(correct[i * N : (i + 1) * N]) for i in range(len(problems))]
    assert any(0 < k < N for k in per_problem), per_problem  # some groups have mixed rewards
    assert all(c.finish_reason == "stop" for c in completions)


def test_writes_problems_that_parse(tutor):
    from stillhouse.tasks.backends.base import SampleRequest, SamplingParams
    from stillhouse.tasks.prompts import harder_messages, similar_messages
    from stillhouse.tasks.synthesis.parse import parse_generated_problem

    cfg = SynthesisConfig()
    parents = [q for q, _ in SIMPLE[:5]] + [STORY[0]]
    requests, owners = [], []
    for i, parent in enumerate(parents):
        for op, build in (("harder", harder_messages), ("similar", similar_messages)):
            requests.append(SampleRequest(f"{op}/{i}", 0, build(parent, PromptsConfig()), 1000 + len(requests)))
            owners.append(parent)
    params = SamplingParams(temperature=cfg.temperature, top_p=0.95, max_new_tokens=64)
    completions = tutor.sample(requests, params)
    parsed = [parse_generated_problem(c.text, parent, cfg) for c, parent in zip(completions, owners, strict=True)]
    ok = [q for q, reason in parsed if q is not None]
    assert len(ok) >= 0.6 * len(parsed), [(c.text, r) for c, (_, r) in zip(completions, parsed)]
    assert all("?" in q for q in ok)


def test_synthesis_keeps_some_problems(tutor):
    from stillhouse.tasks.synthesis.synthesize import synthesize

    pool = _problems(SIMPLE[:6]) + _problems([STORY])
    result = synthesize(
        tutor, easy=pool[:3], hard=pool[3:], pool=pool, eval_problems=[], round=0,
        cfg=SynthesisConfig(reference_samples=N, max_new_tokens=64),
        prompts=PromptsConfig(), sampling=SamplingConfig(n=N, max_new_tokens=48),
        verifier=VerifierConfig(workers=0),
    )
    assert result.generated == len(pool)
    assert result.kept >= 1, result.records
    for problem in result.problems:
        assert problem.answer and problem.question.endswith("?")
