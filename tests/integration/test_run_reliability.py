"""A real `stillhouse run` (a child process, its own Prefect API, tiny models) under what users do
beside it: Ctrl-C and SIGTERM, `stillhouse status` in a tight loop, bad inputs, an API key read
from a file. Every interrupted or watched run must end with exactly the dataset of an uninterrupted
one.
"""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import quote

import pytest
import yaml

from stillhouse.storage.lock import RunLock
from stillhouse.tasks.run_view import run_label
from tests.integration.test_flows import SMOKE, _export, _kill_config, _wait_for
from tests.integration.test_openai_backend import MODEL, EchoingOpenAI

pytestmark = [pytest.mark.integration, pytest.mark.server]

# Generous: a stop takes a few seconds (the next safe point, at most the 10 s grace, then Prefect
# records the crash); a run that ignores the signal runs for minutes.
STOP_BOUND_S = 60


@pytest.fixture(scope="module")
def env(prepared_models_dir, tutor_dir, tmp_path_factory):
    out = {**os.environ, "STILLHOUSE_MODELS_DIR": str(prepared_models_dir),
           "PREFECT_HOME": str(tmp_path_factory.mktemp("prefect-home")), "OMP_NUM_THREADS": "1"}
    out.pop("PREFECT_API_URL", None)  # each run starts its own API server
    return out


def _start(config: Path, env: dict, log: Path, *extra: str) -> subprocess.Popen:
    # Own process group, like a shell job: signals go to the whole group, as a terminal's Ctrl-C.
    with open(log, "ab") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "stillhouse.flows.cli", "run", str(config), *extra],
            stdout=subprocess.DEVNULL, stderr=err, env=env, start_new_session=True,
        )


def _signal_group(proc: subprocess.Popen, *signals: int, gap_s: float = 1.0) -> float:
    """Send the signals to the run's group; seconds until it exited (the test fails past the bound)."""
    t0 = time.monotonic()
    for i, sig in enumerate(signals):
        if i:
            time.sleep(gap_s)
        os.killpg(proc.pid, sig)
    try:
        proc.wait(timeout=STOP_BOUND_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail(f"the run did not stop within {STOP_BOUND_S}s of {[signal.Signals(s).name for s in signals]}")
    return time.monotonic() - t0


def _server_gone(log: Path) -> bool:
    urls = re.findall(r"Prefect API for this run: (\S+)", log.read_text())
    assert urls, "the run did not say where its Prefect API was"
    try:
        urllib.request.urlopen(f"{urls[-1]}/health", timeout=2)
    except OSError:
        return True
    return False


def _flow_run_states(prefect_home: str, name: str) -> list[str]:
    with sqlite3.connect(Path(prefect_home) / "prefect.db") as db:
        return [r[0] for r in db.execute("SELECT state_type FROM flow_run WHERE name = ? ORDER BY created", [name])]


@pytest.fixture(scope="module")
def reference(env, tmp_path_factory):
    """An uninterrupted run of the kill-test config: the dataset every other run must end with."""
    tmp = tmp_path_factory.mktemp("reference")
    cfg, workdir = _kill_config(tmp, "reference")
    proc = _start(cfg, env, tmp / "run.log")
    assert proc.wait(timeout=900) == 0, (tmp / "run.log").read_text()[-3000:]
    return {r: _export(workdir, r, tmp / f"ref-{r}.parquet") for r in (0, 1)}


def _same_dataset(workdir: Path, reference: dict, tmp: Path) -> None:
    for r in (0, 1):
        got = _export(workdir, r, tmp / f"got-{r}.parquet")
        assert len(got) == len(reference[r]) and got == reference[r]


# Four runs and the module's reference run (~7 min on 2 idle cores): more than the suite's 900 s
# on a loaded machine.
@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_signals_stop_the_run_at_a_safe_point_and_a_rerun_equals_uninterrupted(env, reference, tmp_path):
    cfg, workdir = _kill_config(tmp_path, "stopped")
    log = tmp_path / "run.log"
    teacher_parts = lambda: list((workdir / "cache" / "teacher").glob("*/part-*.parquet"))  # noqa: E731
    checkpoints = lambda: list((workdir / "adapters").glob("round-0/*/checkpoints/step-*/manifest.json"))  # noqa: E731
    stops: dict[str, float] = {}

    # Ctrl-C mid-sampling: the whole group gets SIGINT, as from a terminal.
    proc = _start(cfg, env, log)
    assert _wait_for(lambda: len(teacher_parts()) >= 1, proc), f"sampling never started: {log.read_text()[-2000:]}"
    kept = set(teacher_parts())
    stops["SIGINT mid-sampling"] = _signal_group(proc, signal.SIGINT)
    assert proc.returncode == 128 + signal.SIGINT
    text = log.read_text()
    assert f"Resume with: stillhouse run {cfg}" in text
    assert kept <= set(teacher_parts())  # finished shards are kept
    assert not list((workdir / "cache" / "teacher").glob("*/_manifest.json")), "stopped too late"
    RunLock(workdir).acquire().release()  # the workdir lock is free
    assert _server_gone(log)  # and the run's Prefect API went with it
    assert _flow_run_states(env["PREFECT_HOME"], run_label("smoke", workdir))[-1] == "CRASHED"

    # Ctrl-C twice mid-training: the second one stops at once.
    proc = _start(cfg, env, log)
    assert _wait_for(lambda: len(checkpoints()) >= 1, proc), f"training never checkpointed: {log.read_text()[-2000:]}"
    stops["SIGINT twice mid-training"] = _signal_group(proc, signal.SIGINT, signal.SIGINT, gap_s=0.2)
    assert proc.returncode == 128 + signal.SIGINT
    assert not list((workdir / "adapters").glob("round-0/*/metrics.json")), "stopped too late: training finished"
    assert _flow_run_states(env["PREFECT_HOME"], run_label("smoke", workdir))[-1] == "CRASHED"

    # SIGTERM (systemd, docker stop) once round 1 has started.
    proc = _start(cfg, env, log)
    assert _wait_for(lambda: (workdir / "rounds" / "round-0.json").exists(), proc), log.read_text()[-2000:]
    stops["SIGTERM in round 1"] = _signal_group(proc, signal.SIGTERM)
    assert proc.returncode == 128 + signal.SIGTERM
    assert _server_gone(log)
    RunLock(workdir).acquire().release()

    proc = _start(cfg, env, log)
    assert proc.wait(timeout=900) == 0, log.read_text()[-3000:]
    _same_dataset(workdir, reference, tmp_path)
    print("seconds from signal to exit:", {k: round(v, 1) for k, v in stops.items()})


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_status_in_a_tight_loop_beside_a_run_does_not_break_it(env, reference, tmp_path):
    cfg, workdir = _kill_config(tmp_path, "watched")
    log = tmp_path / "run.log"
    proc = _start(cfg, env, log)
    polls, answered = 0, 0
    while proc.poll() is None:
        if (workdir / "catalog" / "metadata.ducklake").exists():
            status = subprocess.run([sys.executable, "-m", "stillhouse.flows.cli", "status", str(workdir)],
                                    capture_output=True, text=True, env=env, timeout=300)
            polls += 1
            answered += status.returncode == 0
        time.sleep(0.1)
    assert proc.returncode == 0, log.read_text()[-3000:]
    assert polls >= 5 and answered == polls  # readers wait out a commit instead of failing
    _same_dataset(workdir, reference, tmp_path)


def test_bad_inputs_fail_before_prefect_starts(env, tmp_path):
    data = yaml.safe_load(SMOKE.read_text())
    data["problems"].append({"kind": "jsonl", "path": str(tmp_path / "missing.jsonl")})
    data["workdir"] = str(tmp_path / "run")
    config = tmp_path / "missing-source.yaml"
    config.write_text(yaml.safe_dump(data))
    cases = {
        "missing source": ([str(config)], "missing.jsonl: No such file or directory"),
        "absurd --rounds": ([str(SMOKE), "--workdir", str(tmp_path / "r"), "--rounds", "100000000000000000000"],
                            "rounds: Input should be less than or equal to 1000"),
    }
    for what, (args, message) in cases.items():
        proc = subprocess.run([sys.executable, "-m", "stillhouse.flows.cli", "run", *args],
                              capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 2, (what, proc.stderr[-2000:])
        assert message in proc.stderr, (what, proc.stderr[-2000:])
        # Refused before any Prefect work, so nothing was retried either.
        assert "flow run" not in proc.stderr and "Retry" not in proc.stderr, (what, proc.stderr[-2000:])


def test_an_api_key_from_a_file_never_lands_in_files_or_the_prefect_database(env, tmp_path):
    key = "sk-Run-Secret-4b1d/9e77+c0de"
    data = yaml.safe_load(SMOKE.read_text())
    data.update(rounds=1, workdir=str(tmp_path / "run"))
    data["weighting"] = {"scheme": "uniform"}  # the fake teacher is never right: train on it anyway
    home = tmp_path / "prefect-home"
    log = tmp_path / "run.log"
    with EchoingOpenAI(api_key=key) as srv:
        data["teacher"] = {"name_or_path": MODEL, "backend": "openai", "base_url": srv.base_url,
                           "api_key_env": "STILLHOUSE_TEST_RUN_KEY", "max_retries": 3, "retry_backoff_s": 0.05}
        config = tmp_path / "openai.yaml"
        config.write_text(yaml.safe_dump(data))
        run_env = {**env, "PREFECT_HOME": str(home), "STILLHOUSE_TEST_RUN_KEY": key + "\n"}  # as read from a file
        proc = _start(config, run_env, log)
        assert proc.wait(timeout=900) == 0, log.read_text()[-3000:]
    assert {e["auth"] for e in srv.log} == {f"Bearer {key}"}
    assert srv.echoed > 0  # the server echoed the key back (503, other case, URL-encoded) before answering
    shapes = [s.encode() for s in (key.lower(), quote(key, safe="").lower())]
    files = [p for root in (tmp_path / "run", home) for p in root.rglob("*") if p.is_file()] + [log]
    assert any(p.name == "prefect.db" for p in files)
    leaks = [(str(p), s) for p in files for s in shapes if s in p.read_bytes().lower()]
    assert not leaks
