"""The scale-out layout on a real PostgreSQL server: the run catalog's DuckLake metadata, and the
Prefect server's database.

Needs the Debian PostgreSQL server binaries (/usr/lib/postgresql/<v>/bin); the catalog test also
needs the pip package `duckdb-extension-postgres` matching duckdb (the extension DuckLake uses for
a Postgres catalog; offline, DuckDB autoloads it from its extension directory, so the test puts
the packaged file there under the name DuckDB looks for, postgres_scanner). Skipped when missing.

A throwaway cluster is created in /tmp (as the `postgres` user when run as root: the server
refuses to run as root), started on a free port and stopped by its pid at teardown.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from stillhouse.storage.catalog import Catalog
from tests.server.harness import free_port

pytestmark = [pytest.mark.server, pytest.mark.integration]


def _pg_bin() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"))
    return found[-1].parent if found else None


def _packaged_postgres_extension() -> Path | None:
    import duckdb

    spec = importlib.util.find_spec("duckdb_extension_postgres")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "extensions" / f"v{duckdb.__version__}" / "postgres.duckdb_extension"
    return path if path.is_file() else None


def _as_postgres_user() -> list[str]:
    """Command prefix that drops root (PostgreSQL refuses to run as root)."""
    if os.geteuid() != 0:
        return []
    if shutil.which("runuser") is None:
        pytest.skip("running as root without runuser to start PostgreSQL as another user")
    try:
        import pwd

        pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("running as root and there is no `postgres` user to start PostgreSQL as")
    return ["runuser", "-u", "postgres", "--"]


@pytest.fixture
def postgres():
    bindir = _pg_bin()
    if bindir is None:
        pytest.skip("no PostgreSQL server binaries in /usr/lib/postgresql (apt package postgresql)")
    drop = _as_postgres_user()
    # Not under tmp_path: pytest keeps its temporary root 0700 and resets that at every session's
    # start, so another pytest session of the same user (two suites at once) would lock the
    # server's user out of its data folder mid-test.
    root = Path(tempfile.mkdtemp(prefix="stillhouse-pg-"))
    os.chmod(root, 0o755)
    data, sock = root / "data", root / "sock"
    data.mkdir()
    sock.mkdir()
    if drop:
        shutil.chown(root, "postgres")
        shutil.chown(data, "postgres")
        shutil.chown(sock, "postgres")
    init = subprocess.run([*drop, str(bindir / "initdb"), "-D", str(data), "-U", "stillhouse", "--auth=trust",
                           "-E", "UTF8"], capture_output=True, text=True, timeout=120, cwd=root)
    assert init.returncode == 0, init.stdout + init.stderr
    port = free_port()
    log = open(root / "server.log", "wb")
    # The postmaster itself, in a session of its own, so that teardown stops it (and its backends)
    # by its pid.
    server = subprocess.Popen(
        [*drop, str(bindir / "postgres"), "-D", str(data), "-p", str(port), "-k", str(sock),
         "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    log.close()
    try:
        dsn = f"host=127.0.0.1 port={port} user=stillhouse"
        deadline = time.monotonic() + 60
        while subprocess.run([str(bindir / "pg_isready"), "-h", "127.0.0.1", "-p", str(port)],
                             capture_output=True).returncode != 0:
            assert server.poll() is None, (root / "server.log").read_text()
            assert time.monotonic() < deadline, "PostgreSQL did not start"
            time.sleep(0.3)
        psql = shutil.which("psql") or str(bindir / "psql")
        subprocess.run([psql, "-h", "127.0.0.1", "-p", str(port), "-U", "stillhouse", "-d", "postgres",
                        "-qc", "CREATE DATABASE lake"], check=True, capture_output=True, timeout=60)
        yield {"dsn": f"dbname=lake {dsn}", "port": port,
               "psql": [psql, "-h", "127.0.0.1", "-p", str(port), "-U", "stillhouse", "-tAc"]}
    finally:
        # SIGINT is PostgreSQL's "fast shutdown"; SIGKILL if it does not go in time.
        for sig, wait in ((signal.SIGINT, 30), (signal.SIGKILL, 10)):
            try:
                os.killpg(server.pid, sig)
                server.wait(timeout=wait)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
        shutil.rmtree(root, ignore_errors=True)


def _problem(pid: str) -> dict:
    return {"problem_id": pid, "question": f"What is {pid}?", "answer": "2", "source": "pg", "split": "train",
            "parent_id": None, "operation": "seed", "round_introduced": 0, "meta": {}}


def _sample(pid: str, k: int) -> dict:
    return {"sample_id": f"{pid}/r0/{k}/t", "problem_id": pid, "round": 0, "sample_index": k, "teacher": "t",
            "prompt": "p", "response": "#### 2", "extracted": "2", "correct": True, "format_ok": True,
            "reward": 1.0, "advantage": 0.0, "weight": 1.0, "error": None, "sampling_params": {},
            "prompt_tokens": 1, "completion_tokens": 1, "finish_reason": "stop"}


def _home_with_postgres_extension(tmp_path: Path) -> Path:
    """A HOME whose DuckDB extension folder holds the packaged postgres extension: DuckLake loads it
    on ATTACH through DuckDB's autoloading, which looks in $HOME/.duckdb/extensions/<version>/<platform>/
    before the network."""
    import duckdb

    ext = _packaged_postgres_extension()
    if ext is None:
        pytest.skip("no duckdb-extension-postgres package matching this duckdb")
    platform = duckdb.execute("PRAGMA platform").fetchone()[0]
    ext_dir = tmp_path / "home" / ".duckdb" / "extensions" / f"v{duckdb.__version__}" / platform
    ext_dir.mkdir(parents=True)
    shutil.copy(ext, ext_dir / "postgres_scanner.duckdb_extension")
    return tmp_path / "home"


def test_catalog_rounds_on_a_postgres_metadata_store(postgres, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(_home_with_postgres_extension(tmp_path)))

    data_path = str(tmp_path / "lake-data") + "/"
    kw = {"catalog_uri": f"postgres:{postgres['dsn']}", "data_path": data_path}
    with Catalog(tmp_path / "run", **kw) as cat:
        assert cat.add_problems([_problem("a"), _problem("b")]) == 2
        assert cat.add_samples([_sample(p, k) for p in ("a", "b") for k in range(3)]) == 6
        v0 = cat.commit_round(0, {"pass_rate": 1.0}, config_hash="cfg")
        assert cat.add_problems([{**_problem("c"), "round_introduced": 1}]) == 1

    # Another connection (another process in a real deployment) sees the committed version, and
    # time travel to it does not show the later problem.
    with Catalog(tmp_path / "elsewhere", read_only=True, **kw) as cat:
        status = cat.status()
        assert [(r.round, r.status, r.snapshot_id, r.samples) for r in status.rounds] == [(0, "committed", v0, 6)]
        assert cat.read("problems", round=0).num_rows == 2
        assert cat.read("problems").num_rows == 3

    # The metadata is in PostgreSQL, not in a local file.
    out = subprocess.run([*postgres["psql"], "SELECT count(*) FROM ducklake_snapshot", "-d", "lake"],
                         capture_output=True, text=True, check=True)
    assert int(out.stdout.strip()) >= 4
    assert not (tmp_path / "run" / "catalog" / "metadata.ducklake").exists()


def test_prefect_server_on_postgres_holds_pools_and_the_gpu_limit(postgres, tmp_path, models_dir):
    """`prefect server start` with its database on PostgreSQL (asyncpg ships with Prefect)."""
    import sys

    from tests.server.harness import Procs, child_env, wait_healthy

    subprocess.run([*postgres["psql"], "CREATE DATABASE prefect", "-d", "postgres"], check=True,
                   capture_output=True, timeout=60)
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = child_env(tmp_path / "prefect-home", models_dir, url)
    env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = (
        f"postgresql+asyncpg://stillhouse@127.0.0.1:{postgres['port']}/prefect"
    )
    procs = Procs(tmp_path / "logs", env)
    try:
        server = procs.start("server", [sys.executable, "-m", "prefect", "server", "start",
                                        "--host", "127.0.0.1", "--port", str(port)])
        wait_healthy(url, server)
        procs.run(sys.executable, "-m", "prefect", "work-pool", "create", "stillhouse-gpu", "--type", "process")
        procs.run(sys.executable, "-m", "stillhouse.flows.cli", "gpu-limit", "--slots", "2")
    finally:
        procs.stop_all()
    # What the server wrote is in PostgreSQL (the V1 tag limit is stored as a V2 limit `tag:gpu`).
    def query(sql):
        return subprocess.run([*postgres["psql"], sql, "-d", "prefect"], capture_output=True, text=True,
                              check=True).stdout.split()
    assert query("SELECT name FROM work_pool WHERE name = 'stillhouse-gpu'") == ["stillhouse-gpu"]
    assert query("SELECT \"limit\" FROM concurrency_limit_v2 WHERE name = 'tag:gpu'") == ["2"]


@pytest.mark.slow
def test_the_whole_smoke_flow_on_a_postgres_catalog(postgres, tmp_path, models_dir, monkeypatch):
    """`stillhouse run` of the smoke config (2 rounds: sample to synthesis) with `catalog.uri` on
    PostgreSQL: both rounds committed there, the synthesized problems of round 0 in round 1's pool,
    and no local metadata file; a rerun adds nothing."""
    import sys

    import yaml

    from tests.server.harness import SMOKE, Procs, child_env

    home = _home_with_postgres_extension(tmp_path)
    monkeypatch.setenv("HOME", str(home))  # this process reads the catalog too
    data = yaml.safe_load(SMOKE.read_text())
    workdir = tmp_path / "run"
    kw = {"catalog_uri": f"postgres:{postgres['dsn']}", "data_path": str(tmp_path / "lake-data") + "/"}
    data.update(workdir=str(workdir), catalog={"uri": kw["catalog_uri"], "data_path": kw["data_path"]})
    config = tmp_path / "smoke-pg.yaml"
    config.write_text(yaml.safe_dump(data))
    procs = Procs(tmp_path / "logs", {**child_env(tmp_path / "prefect-home", models_dir, None), "HOME": str(home)})
    try:
        procs.run(sys.executable, "-m", "stillhouse.flows.cli", "run", str(config), timeout=600)
        with Catalog(tmp_path / "elsewhere", read_only=True, **kw) as cat:
            rounds = {r.round: (r.status, r.samples) for r in cat.status().rounds}
            problems = cat.read("problems").to_pylist()
        assert {r: st for r, (st, _) in rounds.items()} == {0: "committed", 1: "committed"}
        assert all(n > 0 for _, n in rounds.values()), rounds
        assert any(p["round_introduced"] == 1 for p in problems), "no synthesized problem reached round 1"
        assert not (workdir / "catalog" / "metadata.ducklake").exists()
        out = subprocess.run([*postgres["psql"], "SELECT count(*) FROM ducklake_snapshot", "-d", "lake"],
                             capture_output=True, text=True, check=True)
        snapshots = int(out.stdout.strip())
        procs.run(sys.executable, "-m", "stillhouse.flows.cli", "run", str(config), timeout=600)
        with Catalog(tmp_path / "elsewhere", read_only=True, **kw) as cat:
            assert {r.round: (r.status, r.samples) for r in cat.status().rounds} == rounds
            assert cat.read("problems").num_rows == len(problems)
    finally:
        procs.stop_all()
    assert snapshots >= 4
