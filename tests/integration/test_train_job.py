"""A round's training as a job for another process (tasks/train_job.py), without Prefect.

The smoke config's rounds 0 and 1 up to round 1's committed dataset version, with the workdir given
relative to the test's working directory (as a user's config has it); then round 1's training, which
starts from round 0's adapter, runs once in process and once in a fresh Python process started in
another directory, from nothing but the job folder the round writes. Both must land in the same adapter folder with the same weights (same seed, same data,
same init), the job's worker record must name the other process, and a second run of the job must find
it trained. The work-pool half (a flow run on a worker) is tests/server/test_scaleout.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stillhouse.tasks import steps, train_job
from stillhouse.tasks.config import load_config
from stillhouse.tasks.training.trainer import finished_result

pytestmark = pytest.mark.integration

SMOKE = Path(__file__).resolve().parents[2] / "configs" / "smoke.yaml"


def _weights(adapter: str | Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(adapter) / "adapter_model.safetensors"))


def test_a_training_job_in_another_process_writes_the_in_process_adapter(tmp_path, models_dir, monkeypatch):
    data = yaml.safe_load(SMOKE.read_text())
    data.update(workdir="run", rounds=2)  # relative: the job must not depend on the round's cwd
    (tmp_path / "smoke.yaml").write_text(yaml.safe_dump(data))
    monkeypatch.chdir(tmp_path)
    cfg = load_config(tmp_path / "smoke.yaml")
    assert cfg.training.init == "previous"

    def committed(round: int):
        sampled = steps.sample_teacher(cfg, round)
        weighted = steps.weigh_samples(cfg, round, steps.verify_samples(cfg, round, sampled))
        return steps.commit_version(cfg, round, weighted, {"round": round})

    # Round 1 trains from round 0's adapter (given by a relative path, as the round holds it): the
    # job has to carry the config, the version and that adapter to another working directory.
    steps.seed_problems(cfg)
    first = steps.train_student(cfg, 0, committed(0), None)
    assert not Path(first.path).is_absolute()
    version = committed(1)
    local = steps.train_student(cfg, 1, version, first)
    assert local.computed and local.metrics["steps"] > 0
    expected = _weights(local.path)
    key, out, init = steps.train_target(cfg, 1, version, first)
    assert (key, init) == (local.key, first.path) and Path(local.path).resolve().parent == out.resolve()
    shutil.rmtree(out)

    folder = train_job.write_job(cfg, 1, version, first)
    assert folder.is_absolute() and folder.parent == out.resolve().parent
    spec = json.loads((folder / train_job.JOB_FILE).read_text())
    assert Path(spec["config"]["workdir"]).is_absolute() and Path(spec["previous"]["path"]).is_absolute()
    assert train_job.finished(folder) is None  # nothing trained yet

    elsewhere = tmp_path / "worker-cwd"
    elsewhere.mkdir()
    code = ("import json, sys; from stillhouse.tasks.train_job import run_train_job; "
            "print(json.dumps(run_train_job(sys.argv[1], heartbeat_s=0.5, attempt='0')))")
    proc = subprocess.run([sys.executable, "-c", code, str(folder)], cwd=elsewhere, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "PYTHONPATH": ""})
    assert proc.returncode == 0, proc.stderr[-4000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["reused"] is False and info["pid"] != os.getpid() and info["hostname"]
    assert Path(info["adapter"]).resolve() == Path(local.path).resolve()
    assert info["metrics"]["steps"] == local.metrics["steps"]
    assert train_job.finished(folder)["pid"] == info["pid"]
    assert not (elsewhere / "run").exists()  # nothing written relative to the worker's cwd

    got = _weights(local.path)
    assert sorted(got) == sorted(expected)
    import torch

    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-4, atol=1e-6, msg=name)
    # The round reads the worker's adapter as its own: the step finds it finished.
    again = steps.train_student(cfg, 1, version, first)
    assert not again.computed and Path(again.path).resolve() == Path(local.path).resolve()
    assert finished_result(out).steps == local.metrics["steps"]

    # A resubmitted job whose first attempt did finish: found, not trained again.
    repeat = train_job.run_train_job(folder, heartbeat_s=0.5, attempt="1")
    assert repeat["reused"] is True and repeat["pid"] == info["pid"]


def test_a_job_folder_the_worker_cannot_see_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no training job.*same path on every machine"):
        train_job.run_train_job(tmp_path / "missing.job")
