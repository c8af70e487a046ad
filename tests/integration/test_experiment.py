"""`stillhouse experiment` on the smoke experiment (tiny models, 2 arms x 2 seeds, 1 round), against
a real temporary Prefect server: arms share the teacher's samples, budgets are equal,
experiment.json carries every figure, and a SIGKILL + rerun ends with the same numbers."""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stillhouse.tasks.experiment.spec import load_experiment

pytestmark = [pytest.mark.integration, pytest.mark.server]

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "configs" / "experiments" / "smoke.yaml"


@pytest.fixture(scope="module")
def smoke(models_dir, tmp_path_factory):
    """The smoke experiment run once in process; model work counted per step (teacher / student)
    where it really happens: generations the cache layer had to ask the model for."""
    from prefect.testing.utilities import prefect_test_harness

    from stillhouse.tasks.backends.resumable import ResumableBackend

    workdir = tmp_path_factory.mktemp("smoke-experiment")
    generated: collections.Counter[str] = collections.Counter()
    real = ResumableBackend.sample

    def counting(self, requests, params, progress=None):
        before = self.generated
        try:
            return real(self, requests, params, progress)
        finally:
            generated[self.step] += self.generated - before

    mp = pytest.MonkeyPatch()
    mp.setattr(ResumableBackend, "sample", counting)
    try:
        with prefect_test_harness(server_startup_timeout=120):
            from stillhouse.flows.experiment import run_experiment

            out = run_experiment(str(SMOKE), str(workdir))
            artifacts = _artifacts()
    finally:
        mp.undo()
    return load_experiment(SMOKE, str(workdir)), out, generated, artifacts


def _artifacts() -> dict[str, str]:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return {a.key: a.data for a in client.read_artifacts(limit=200) if a.key}


def test_arms_share_the_teachers_samples(smoke):
    exp, out, generated, _ = smoke
    c = exp.config
    one = exp.runs[(c.control, c.seeds[0])]
    pool = sum(1 for p in _pool_ids(one))
    per_arm = pool * one.sampling.n
    # Teacher generations: one arm's worth per seed, not arms x that.
    assert generated["teacher"] == per_arm * len(c.seeds)
    summary = out["summary"]
    assert summary["teacher_samples_per_seed"] == {str(s): per_arm for s in c.seeds}
    assert summary["teacher_samples_per_arm"] == {str(s): {a: per_arm for a in c.arms} for s in c.seeds}
    for seed in c.seeds:
        firsts = [summary["runs"][arm][str(seed)]["teacher_generated"] for arm in c.arms]
        assert sorted(firsts) == [0] * (len(c.arms) - 1) + [per_arm]  # the first arm paid, the rest found it
        assert all(summary["runs"][arm][str(seed)]["teacher_samples"] == per_arm for arm in c.arms)


def _pool_ids(cfg):
    from stillhouse.tasks.steps import open_catalog, pool_and_eval

    with open_catalog(cfg, read_only=True) as cat:
        pool, _ = pool_and_eval(cat, 0)
    return [p.id for p in pool]


def test_every_arm_trains_the_same_number_of_steps_on_datasets_of_different_size(smoke):
    exp, out, _, _ = smoke
    runs = out["summary"]["runs"]
    steps = {r["train_steps"] for arm in runs.values() for r in arm.values()}
    assert steps == {exp.config.optimizer_steps}
    used = {arm: {r["train_samples_used"] for r in per_seed.values()} for arm, per_seed in runs.items()}
    # uniform trains on every sample; group_advantage drops zero-weight groups: fewer distinct samples.
    assert max(used["group_advantage"]) < min(used["uniform"])


def test_experiment_json_has_the_promised_fields(smoke):
    exp, out, _, _ = smoke
    on_disk = json.loads(Path(out["json"]).read_text())
    assert on_disk == json.loads(json.dumps(out["summary"]))
    c = exp.config
    assert [a["name"] for a in on_disk["arms"]] == ["base", "uniform", "group_advantage"]
    assert on_disk["control"] == "uniform" and on_disk["seeds"] == [0, 1]
    n_eval = on_disk["eval_sets"]["arithmetic"]
    assert n_eval == 4 and on_disk["eval_sets"]["overall"] == n_eval
    for arm in ("base", "uniform", "group_advantage"):
        for s in ("arithmetic", "overall"):
            acc = on_disk["accuracy"][arm][s]
            assert acc["seeds"] == len(c.seeds) and acc["problems"] == n_eval
            assert acc["ci95"][0] <= acc["mean"] <= acc["ci95"][1]
            assert 0.0 <= acc["ci95"][0] and acc["ci95"][1] <= 1.0
    assert set(on_disk["vs_control"]) == {"base", "group_advantage"}
    for arm, per_set in on_disk["vs_control"].items():
        d = per_set["overall"]
        assert d["mean"] == pytest.approx(on_disk["accuracy"][arm]["overall"]["mean"]
                                          - on_disk["accuracy"]["uniform"]["overall"]["mean"])
        assert len(d["mcnemar_p_per_seed"]) == len(c.seeds) and d["mcnemar_p"] is None
        assert all(0.0 <= p <= 1.0 for p in d["mcnemar_p_per_seed"]) and d["mde80"] > 0
        assert d["significant"] == (d["ci95"][0] > 0 or d["ci95"][1] < 0)
        assert d["ci95"][0] <= d["mean"] <= d["ci95"][1]
        assert d["arm_better"] + d["arm_worse"] <= len(c.seeds) * n_eval


def test_base_is_read_from_the_runs_base_rows(smoke):
    exp, out, _, _ = smoke
    base = json.loads((Path(exp.run_dir("uniform", 0)) / "rounds" / "base.json").read_text())
    assert out["summary"]["accuracy"]["base"]["arithmetic"]["mean"] == pytest.approx(base["student_accuracy"]["arithmetic"])


def test_report_files_hold_the_table_and_the_plot(smoke):
    exp, out, _, _ = smoke
    md = Path(out["markdown"]).read_text()
    assert "| arm |" in md and "group_advantage" in md and "McNemar p" in md
    assert (exp.workdir / "experiment.png").read_bytes()[:4] == b"\x89PNG"
    page = Path(out["html"]).read_text()
    assert "<table>" in page and "data:image/png;base64," in page


def test_the_experiment_artifact_is_published(smoke):
    exp, out, _, artifacts = smoke
    md = artifacts["smoke-experiment-experiment"]
    assert "| arm |" in md and "group_advantage" in md
    # The same numbers as experiment.json: the control's overall accuracy with its interval.
    acc = out["summary"]["accuracy"]["uniform"]["overall"]
    assert f"{acc['mean']:.3f} [{acc['ci95'][0]:.3f}, {acc['ci95'][1]:.3f}]" in md
    # Every run of every arm published its own artifacts under its own name.
    # (keyed by each run's label: its name and its workdir's id)
    for a in ("uniform", "group-advantage"):
        for s in (0, 1):
            assert any(k.startswith(f"smoke-experiment-{a}-seed{s}-") and k.endswith("-report") for k in artifacts)


def _cli(workdir: Path, env: dict, log: Path) -> subprocess.Popen:
    # The log goes to a file: four runs' progress bars overflow a pipe nobody reads until the end,
    # and the child would block writing to it.
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "stillhouse.flows.cli", "experiment", str(SMOKE), "--workdir", str(workdir)],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:]


@pytest.mark.slow
def test_sigkill_then_rerun_finishes_with_the_same_numbers(smoke, models_dir, tmp_path):
    _, out, _, _ = smoke
    env = {**os.environ, "STILLHOUSE_MODELS_DIR": str(models_dir), "PREFECT_HOME": str(tmp_path / "ph")}
    workdir = tmp_path / "exp"
    second_run = workdir / "arms" / "group_advantage" / "seed-0"
    log = tmp_path / "experiment.log"
    proc = _cli(workdir, env, log)
    deadline = time.monotonic() + 600
    while not second_run.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, f"ended before the second run started: {_tail(log)}"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (workdir / "experiment.json").exists()

    proc = _cli(workdir, env, log)
    assert proc.wait(timeout=900) == 0, _tail(log)
    got = json.loads((workdir / "experiment.json").read_text())
    want = out["summary"]
    for field in ("arms", "eval_sets", "accuracy", "vs_control", "teacher_samples_per_seed",
                  "teacher_samples_per_arm"):
        assert got[field] == json.loads(json.dumps(want[field])), field
    steps = lambda s: {a: {k: r["train_steps"] for k, r in v.items()} for a, v in s["runs"].items()}  # noqa: E731
    assert steps(got) == steps(want)
