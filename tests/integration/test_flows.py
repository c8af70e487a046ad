"""The multi-round flow end to end on tiny models, against a real (temporary) Prefect server.

Model work is counted by wrapping the real hf backend's `sample` and the real trainer: a rerun of a
finished run must do none of it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from stillhouse.storage.catalog import Catalog
from stillhouse.tasks.config import load_config

pytestmark = [pytest.mark.integration, pytest.mark.server]

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "configs" / "smoke.yaml"


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


class ModelWork:
    """Counts real generate calls and real training runs."""

    def __init__(self, monkeypatch):
        import stillhouse.tasks.backends.hf as hf
        import stillhouse.tasks.training.trainer as training

        self.samples = 0
        self.trainings = 0
        real_sample, real_train = hf.HFBackend.sample, training.train_lora

        def sample(backend, requests, params, progress=None):
            self.samples += len(requests)
            return real_sample(backend, requests, params, progress)

        def train(*args, **kwargs):
            self.trainings += 1
            return real_train(*args, **kwargs)

        monkeypatch.setattr(hf.HFBackend, "sample", sample)
        monkeypatch.setattr(training, "train_lora", train)


def _run(cfg):
    from stillhouse.flows.distill import run

    return run(cfg)


@pytest.fixture(scope="module")
def smoke_run(harness, models_dir, tmp_path_factory):
    mp = pytest.MonkeyPatch()
    work = ModelWork(mp)
    cfg = load_config(SMOKE, workdir=str(tmp_path_factory.mktemp("smoke") / "run"))
    t0 = time.monotonic()
    history = _run(cfg)
    elapsed = time.monotonic() - t0
    mp.undo()
    return cfg, history, work, elapsed


def test_two_rounds_complete_with_versions_and_lineage(smoke_run):
    cfg, history, work, _ = smoke_run
    assert [m["round"] for m in history] == [0, 1]
    assert work.samples > 0 and work.trainings == 2
    with Catalog(cfg.workdir, read_only=True) as cat:
        rounds = {r.round: r for r in cat.status().rounds}
        assert rounds[0].status == rounds[1].status == "committed"
        assert rounds[0].snapshot_id < rounds[1].snapshot_id
        pool0 = history[0]["pool"]
        assert rounds[0].samples == pool0 * cfg.sampling.n
        # time travel: round 0's version holds no round-1 samples
        assert cat.read("samples", round=0).num_rows == rounds[0].samples
        problems = cat.read("problems").to_pylist()
        new = [p for p in problems if p["operation"] != "seed"]
        # The smoke teacher (tiny-tutor) writes problems that pass the filters: lineage is exercised.
        assert len(new) == history[0]["synth_kept"] > 0
        assert {p["operation"] for p in new} <= {"harder", "similar"}
        assert history[0]["easy"] > 0 and history[0]["hard"] > 0
        for p in new:  # every synthesized problem chains back to a seed
            chain = cat.lineage(p["problem_id"])
            assert chain[0]["problem_id"] == p["problem_id"] and chain[-1]["operation"] == "seed"
            assert p["round_introduced"] == 1
        diff = cat.diff(0, 1)
        assert sorted(diff.problems_added) == sorted(p["problem_id"] for p in new)
        # Every problem the teacher wrote is recorded, kept or dropped with its reason.
        records = cat.synthesis_records(0).to_pylist()
        assert len(records) == history[0]["synth_generated"]
        assert sorted(r["problem_id"] for r in records if r["status"] == "kept") == sorted(p["problem_id"] for p in new)
        dropped = [r for r in records if r["status"] == "dropped"]
        by_reason = {k: v for k, v in history[0]["synth_dropped"].items() if v}
        assert {r: sum(d["reason"] == r for d in dropped) for r in by_reason} == by_reason
        assert diff.dropped_by_reason == by_reason
        assert sorted(d["generation_key"] for d in diff.dropped) == sorted(r["generation_key"] for r in dropped)
        assert all(r["reply"] and r["parent_id"] and r["operation"] in ("harder", "similar") for r in records)
        weights = cat.samples_for_round(0)["weight"].to_pylist()
        assert len(weights) == rounds[0].samples
    summary = json.loads((Path(cfg.workdir) / "rounds" / "round-1.json").read_text())
    assert summary["round"] == 1 and "student_accuracy" in summary


def test_the_untrained_student_is_a_row(smoke_run):
    cfg, history, _, _ = smoke_run
    base = json.loads((Path(cfg.workdir) / "rounds" / "base.json").read_text())
    # Same eval sets and problems as every round, each accuracy with its n and interval.
    assert base["eval_counts"] == history[0]["eval_counts"] and base["eval_total"] > 0
    for s, acc in base["student_accuracy"].items():
        lo, hi = base["student_accuracy_ci"][s]
        assert lo <= acc <= hi
    with Catalog(cfg.workdir, read_only=True) as cat:
        rows = [r for r in cat.read("eval_results").to_pylist() if r["round"] == -1]
    assert len(rows) == base["eval_total"] and all(r["eval_set"] != "pool" for r in rows)
    assert sum(r["correct"] for r in rows) == round(base["student_overall"] * base["eval_total"])
    # Each trained round says how many eval answers it shares with the untrained student. (The smoke
    # student trains 2-4 steps at lr 2e-4: its greedy answers stay the base model's, 1.0, and the
    # round logs the "adapter not applied?" warning; tests/unit/test_steps_base.py checks the share.)
    for m in history:
        assert 0.0 <= m["same_answers_as_base"] <= 1.0


def test_rerun_does_no_model_work(smoke_run, monkeypatch):
    cfg, history, _, _ = smoke_run
    work = ModelWork(monkeypatch)
    again = _run(cfg)
    assert work.samples == 0 and work.trainings == 0
    assert [m["steps_computed"] for m in again] == [[], []]
    results = ("pool", "samples", "teacher_accuracy", "mean_abs_weight", "snapshot", "train_loss",
               "student_accuracy", "easy", "hard", "synth_kept", "adapter")
    assert [{k: m.get(k) for k in results} for m in again] == [{k: m.get(k) for k in results} for m in history]
    # Issue 15: the rerun's record keeps what the work cost when it was done, not the cost of looking.
    for m, first in zip(again, history):
        assert first["model_seconds"] > 0 and first["generated"] > 0
        for k in ("model_seconds", "wall_seconds", "generated", "teacher_tokens_out", "train_tokens"):
            assert m[k] == first[k], k
        assert m["rerun_wall_seconds"] > 0
        on_disk = json.loads((Path(cfg.workdir) / "rounds" / f"round-{m['round']}.json").read_text())
        assert on_disk["model_seconds"] == first["model_seconds"]

    # ... and the UI shows it: every step of the rerun's rounds ended Cached, the flow runs carry
    # the run's name, workdir id and round as tags.
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    from stillhouse.tasks.run_view import run_label, workdir_id

    label = run_label(cfg.run_name, cfg.workdir)
    with get_client(sync_client=True) as client:
        for r in (0, 1):
            runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[f"{label}-round-{r}"])),
                                         sort=FlowRunSort.START_TIME_DESC)
            assert len(runs) == 2  # the first run and the rerun
            assert {f"run:{cfg.run_name}", f"workdir:{workdir_id(cfg.workdir)}", f"round:{r}"} <= set(runs[0].tags)
            states = {t.name: t.state.name for t in client.read_task_runs(
                flow_run_filter=FlowRunFilter(id={"any_": [runs[0].id]}))}
            expected = {"sample-teacher", "verify-samples", "weigh-samples", "commit-version", "train-student",
                        "evaluate", "split-pool"}
            expected |= {"synthesize-problems"} if r == 0 else set()
            assert set(states) == expected  # names without random suffixes
            assert set(states.values()) == {"Cached"}, states
        first = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[f"{label}-round-0"])),
                                      sort=FlowRunSort.START_TIME_ASC)[0]
        states = {t.name: t.state.name for t in client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [first.id]}))}
        assert states["sample-teacher"] == states["train-student"] == "Completed"  # the run that did the work


def test_round_pages_tell_the_rounds_story(smoke_run):
    """The round artifact: dataset version, config hash, the base row, every accuracy with n and
    interval, the pool's whole accounting, the last round's note, plots and the report's link;
    each number read from the run's own record, not from this test."""
    import base64
    from urllib.parse import unquote, urlparse

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from stillhouse.flows.monitoring import artifact_key
    from stillhouse.tasks.evaluation import accuracy_text
    from stillhouse.tasks.run_view import config_hash, run_label

    cfg, history, _, _ = smoke_run
    label = run_label(cfg.run_name, cfg.workdir)
    keys = [artifact_key(f"{label}-round-0"), artifact_key(f"{label}-round-1"), artifact_key(f"{label}-report")]
    with get_client(sync_client=True) as client:
        found = {a.key: a for a in client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys)))}
    assert set(found) == set(keys)
    base = json.loads((Path(cfg.workdir) / "rounds" / "base.json").read_text())
    with Catalog(cfg.workdir, read_only=True) as cat:
        snapshots = {r: cat.round_snapshot(r) for r in (0, 1)}
    for r in (0, 1):
        m = json.loads((Path(cfg.workdir) / "rounds" / f"round-{r}.json").read_text())
        md = found[artifact_key(f"{label}-round-{r}")].data
        assert found[artifact_key(f"{label}-round-{r}")].type == "markdown"
        assert f"snapshot {snapshots[r]}" in md and config_hash(cfg) in md and f"`{label}`" in md
        if r == 1:
            assert f"previous round 0: snapshot {snapshots[0]}" in md
        assert "base (untrained)" in md and accuracy_text(base["student_overall"], base["eval_total"]) in md
        assert accuracy_text(m["student_overall"], m["eval_total"]) in md
        for s, acc in m["student_accuracy"].items():
            assert accuracy_text(acc, m["eval_counts"][s]) in md
        # easy + mid + hard is the whole pool, and the page says so
        assert m["easy"] + m["mid"] + m["hard"] == m["pool"]
        assert f"{m['easy']} / {m['mid']} / {m['hard']} (= {m['pool']} of {m['pool']})" in md
        if r == 0:
            assert "seed pool" in md and f"{m['synth_generated']} written / {m['synth_kept']} kept" in md
        else:
            assert m["pool_added"] == m["pool"] - history[0]["pool"] == history[0]["synth_added"]
            assert f"{m['pool_added']:+,}" in md and "last round" in md
        # three embedded PNG plots and a link to the report file that exists
        images = [line for line in md.splitlines() if line.startswith("![")]
        assert len(images) == 3
        for line in images:
            assert base64.b64decode(line.split("base64,", 1)[1].rstrip(")"))[:8] == b"\x89PNG\r\n\x1a\n"
        link = re.search(r"\]\((file://[^)]+report\.html)\)", md).group(1)
        assert Path(unquote(urlparse(link).path)).is_file()
    curve = found[artifact_key(f"{label}-report")].data
    assert all(f"| {r} | {snapshots[r]} |" in curve for r in (0, 1))


def test_a_non_ascii_run_name_runs_and_publishes_its_artifacts(smoke_run, tmp_path):
    """Issue 16: "Präzision" kept its "ä" in the artifact key; Prefect refused it after all of
    round 0's model work, on every rerun. A rerun of the finished smoke run (no model work)
    under that name now finishes and publishes valid keys."""
    from prefect.client.orchestration import get_client

    from stillhouse.flows.monitoring import artifact_key

    cfg, history, _, _ = smoke_run
    workdir = tmp_path / "copy"
    shutil.copytree(cfg.workdir, workdir)
    renamed = load_config(SMOKE, workdir=str(workdir), run_name="Präzision")
    again = _run(renamed)
    assert [m["round"] for m in again] == [m["round"] for m in history]
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from stillhouse.tasks.run_view import run_label

    label = run_label("Präzision", workdir)
    expected = {artifact_key(f"{label}-round-0"), artifact_key(f"{label}-round-1"), artifact_key(f"{label}-report")}
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=sorted(expected))))
    assert {a.key for a in found} == expected
    assert all(k.startswith("prazision-") for k in expected)


def test_config_change_reruns_exactly_the_steps_it_shapes(smoke_run, tmp_path, monkeypatch):
    cfg, _, _, _ = smoke_run
    workdir = tmp_path / "copy"
    shutil.copytree(cfg.workdir, workdir)
    one_round = load_config(SMOKE, workdir=str(workdir), rounds=1)

    changed = one_round.model_copy(update={"evaluation": one_round.evaluation.model_copy(update={"pool_k": 3})})
    work = ModelWork(monkeypatch)
    out = _run(changed)
    assert out[0]["steps_computed"] == ["evaluate", "split"]
    assert work.trainings == 0 and work.samples > 0  # only the student's new pool samples

    changed = one_round.model_copy(
        update={"training": one_round.training.model_copy(update={"learning_rate": 1e-3})}
    )
    work = ModelWork(monkeypatch)
    out = _run(changed)
    assert out[0]["steps_computed"] == ["train", "evaluate", "split"]
    assert work.trainings == 1

    # A change that would alter a committed version is refused, naming the round, the changed field
    # with both values, and the way out (a new --workdir).
    changed = one_round.model_copy(update={"rewards": one_round.rewards.model_copy(update={"format": 0.5})})
    with pytest.raises(Exception, match="round 0 is already committed") as refused:
        _run(changed)
    assert f"rewards.format: {one_round.rewards.format} -> 0.5" in str(refused.value)
    assert "--workdir" in str(refused.value)
    # ... at once: a refusal is not retried (retries are for I/O that can succeed later).
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName, TaskRunFilterState, \
        TaskRunFilterStateType
    from prefect.client.schemas.objects import StateType

    with get_client(sync_client=True) as client:
        failed = client.read_task_runs(task_run_filter=TaskRunFilter(
            name=TaskRunFilterName(like_="commit-version"),
            state=TaskRunFilterState(type=TaskRunFilterStateType(any_=[StateType.FAILED])),
        ))
    assert failed and all(t.run_count == 1 for t in failed), [(t.name, t.run_count) for t in failed]


def test_budget_stops_before_the_teacher_step_and_the_run_resumes_when_raised(smoke_run, tmp_path, monkeypatch):
    """A third round on a copy of the finished smoke run, with a teacher-token budget of exactly
    what the run has spent: rounds 0-1 recheck (nothing to pay), round 1's synthesis (now not the
    last round) would pass the budget and is not started; nothing is committed past round 1. With
    the budget raised the same run continues, redoing no sampling of rounds 0-1."""
    from stillhouse.tasks.ledger import BudgetExhausted, read_ledger, spent

    cfg, history, _, _ = smoke_run
    workdir = tmp_path / "copy"
    shutil.copytree(cfg.workdir, workdir)
    used, _ = spent(read_ledger(workdir))
    assert used == sum(m["teacher_tokens_in"] + m["teacher_tokens_out"] for m in history) > 0
    three = load_config(SMOKE, workdir=str(workdir), rounds=3)
    capped = three.model_copy(update={"cost": three.cost.model_copy(update={"max_teacher_tokens": used})})
    work = ModelWork(monkeypatch)
    with pytest.raises(BudgetExhausted, match=f"before round 1's synthesis: cost.max_teacher_tokens = {used}"):
        _run(capped)
    assert work.samples == 0  # stopped before the teacher generated anything
    with Catalog(workdir, read_only=True) as cat:
        assert sorted(r.round for r in cat.status().rounds if r.status == "committed") == [0, 1]
    assert spent(read_ledger(workdir))[0] == used

    out = _run(three)  # no budget: continues
    assert [m["round"] for m in out] == [0, 1, 2]
    assert out[0]["steps_computed"] == [] and out[1]["steps_computed"] == ["synthesize"]
    assert spent(read_ledger(workdir))[0] > used


def test_second_run_on_same_workdir_fails_at_once(smoke_run):
    from stillhouse.storage.lock import RunLock

    cfg, _, _, _ = smoke_run
    with RunLock(cfg.workdir):
        proc = subprocess.run(
            [sys.executable, "-m", "stillhouse.flows.cli", "run", str(SMOKE), "--workdir", cfg.workdir],
            capture_output=True, text=True, timeout=300,
        )
    assert proc.returncode != 0
    assert "in use by pid" in proc.stderr


def test_cli_commands_on_the_smoke_run(smoke_run, tmp_path):
    cfg, _, _, _ = smoke_run

    def cli(*args):
        proc = subprocess.run([sys.executable, "-m", "stillhouse.flows.cli", *args], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    status = cli("status", cfg.workdir)
    assert "committed" in status and "complete" in status
    diff = json.loads(cli("diff", cfg.workdir, "0", "1"))
    assert diff["from_round"] == 0 and diff["samples_added_by_round"]
    out = tmp_path / "r1.parquet"
    cli("export", cfg.workdir, "--round", "1", "--out", str(out))
    assert pq.read_table(out).num_rows > 0
    cli("report", cfg.workdir)
    html = (Path(cfg.workdir) / "report" / "report.html").read_text()
    assert "base (untrained)" in (Path(cfg.workdir) / "report" / "report.md").read_text()
    assert html.count("data:image/png;base64,") == 3
    assert "<table>" in html and "<pre>" not in html  # the round table rendered, not raw Markdown
    if diff["dropped"]:  # the report says why synthesized problems were dropped
        md = (Path(cfg.workdir) / "report" / "report.md").read_text()
        assert "Dropped synthesized problems" in md and diff["dropped"][0]["reason"] in md


# --------------------------------------------------------------------------- kill and resume

KILL_OVERRIDES = {
    # small shards and uniform weights so that both sampling and training span many checkpoints
    "sampling": {"n": 4, "max_new_tokens": 32, "batch_size": 2},
    "weighting": {"scheme": "uniform"},
    "training": {"batch_size": 2, "max_length": 256, "checkpoint_every": 1, "epochs": 2},
}


def _kill_config(tmp_path: Path, name: str) -> tuple[Path, Path]:
    data = yaml.safe_load(SMOKE.read_text())
    for section, values in KILL_OVERRIDES.items():
        data.setdefault(section, {}).update(values)
    workdir = tmp_path / name
    data["workdir"] = str(workdir)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path, workdir


def _cli_run(config: Path, env: dict) -> subprocess.Popen:
    # Own process group: the kill takes the run and its ephemeral Prefect server down together,
    # as when a node dies, and leaves no server behind. Its log goes to a file beside the config:
    # a pipe read only at the end fills up with progress bars and blocks the child.
    log = config.with_suffix(".log")
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "stillhouse.flows.cli", "run", str(config)],
            stdout=subprocess.DEVNULL, stderr=out, env=env, start_new_session=True,
        )
    proc.log = log
    return proc


def _kill(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _log_tail(proc: subprocess.Popen) -> str:
    return proc.log.read_text(errors="replace")[-2000:]


def _ended(proc: subprocess.Popen) -> str:
    """How a run that stopped early ended (its exit status and the tail of its log)."""
    if proc.poll() is None:
        return "still running (timed out)"
    return f"exit {proc.returncode}: {_log_tail(proc)}"


def _wait_for(predicate, proc, timeout=600):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.05)
    return False


def _export(workdir: Path, round: int, out: Path):
    with Catalog(workdir, read_only=True) as cat:
        cat.export(round, out)
    return pq.read_table(out).sort_by("sample_id").to_pylist()


@pytest.mark.slow
def test_sigkill_mid_sampling_and_mid_training_then_rerun_equals_uninterrupted(models_dir, tmp_path):
    env = {**os.environ, "STILLHOUSE_MODELS_DIR": str(models_dir), "PREFECT_HOME": str(tmp_path / "ph")}

    ref_cfg, ref_dir = _kill_config(tmp_path, "reference")
    proc = _cli_run(ref_cfg, env)
    assert proc.wait(timeout=900) == 0, _log_tail(proc)

    cfg, workdir = _kill_config(tmp_path, "killed")
    teacher_parts = lambda: list((workdir / "cache" / "teacher").glob("*/part-*.parquet"))  # noqa: E731
    checkpoints = lambda: list((workdir / "adapters").glob("round-0/*/checkpoints/step-*/manifest.json"))  # noqa: E731

    proc = _cli_run(cfg, env)
    assert _wait_for(lambda: len(teacher_parts()) >= 1, proc), f"sampling never started: {_ended(proc)}"
    _kill(proc)
    manifests = list((workdir / "cache" / "teacher").glob("*/_manifest.json"))
    assert not manifests, "killed too late: sampling had already finished"

    proc = _cli_run(cfg, env)
    assert _wait_for(lambda: len(checkpoints()) >= 1, proc), f"training never checkpointed: {_ended(proc)}"
    _kill(proc)
    assert not list((workdir / "adapters").glob("round-0/*/metrics.json")), "killed too late: training finished"

    proc = _cli_run(cfg, env)
    assert proc.wait(timeout=900) == 0, _log_tail(proc)

    for r in (0, 1):
        got = _export(workdir, r, tmp_path / f"killed-{r}.parquet")
        want = _export(ref_dir, r, tmp_path / f"ref-{r}.parquet")
        assert len(got) == len(want) and got == want
