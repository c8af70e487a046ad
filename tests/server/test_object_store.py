"""The catalog's data on an S3-compatible object store (`catalog.data_path: s3://...`).

The server is moto's server mode (`python -m moto.server`, from the test extra): a real HTTP
server speaking the S3 REST protocol on a loopback port, started as its own process and stopped
by its pid at teardown. DuckLake writes and reads through DuckDB's httpfs extension exactly as it
would against AWS or MinIO (signed requests, path-style URLs, multipart uploads); what moto does
not give is real AWS behaviour (IAM policies: it accepts any key; TLS; consistency under load).
The bucket is created and listed with boto3 (a moto dependency), independently of DuckDB.
"""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from stillhouse.storage.catalog import Catalog, CatalogError
from tests.server.harness import SMOKE, Procs, child_env, free_port

pytestmark = [pytest.mark.server, pytest.mark.integration]

BUCKET = "lake"
# Not a real key: moto accepts any. Long enough that finding it in a log is no accident.
KEY_ID = "AKIASTILLHOUSETEST01"
SECRET = "stillhouse-test-secret-4f1c9e0b7a2d"


@pytest.fixture
def s3_server(tmp_path):
    """moto's S3 server on a free loopback port with an empty bucket; the AWS env vars for it."""
    boto3 = pytest.importorskip("boto3", reason="moto[server] (test extra) brings boto3")
    pytest.importorskip("moto.server", reason="moto[server] is in the test extra")
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "moto.log", "wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
    )
    log.close()
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, (tmp_path / "moto.log").read_text()
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "moto's S3 server did not answer in 60 s"
                time.sleep(0.2)
        env = {"AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_REGION": "us-east-1",
               "AWS_ENDPOINT_URL_S3": endpoint}
        client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=KEY_ID,
                              aws_secret_access_key=SECRET, region_name="us-east-1")
        client.create_bucket(Bucket=BUCKET)
        yield {"env": env, "client": client, "endpoint": endpoint, "pid": server.pid}
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)
    assert server.poll() is not None


def _objects(client, prefix: str) -> set[str]:
    """Every key under `prefix`, through the S3 API (paginated)."""
    keys: set[str] = set()
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        keys |= {o["Key"] for o in page.get("Contents", [])}
    return keys


def _data_files(cat: Catalog) -> set[str]:
    """The Parquet files the catalog's current snapshot reads, as s3:// URLs."""
    files: set[str] = set()
    for table in cat.con.execute(f"SELECT table_name FROM duckdb_tables() WHERE database_name = '{cat.alias}'").fetchall():
        rows = cat.con.execute(f"SELECT data_file FROM ducklake_list_files('{cat.alias}', ?)", [table[0]]).fetchall()
        files |= {r[0] for r in rows}
    return files


def _problem(pid: str) -> dict:
    return {"problem_id": pid, "question": f"What is {pid}?", "answer": "2", "source": "s3", "split": "train",
            "parent_id": None, "operation": "seed", "round_introduced": 0, "meta": {}}


def test_catalog_rounds_with_their_data_in_a_bucket(s3_server, tmp_path, monkeypatch):
    for k, v in s3_server["env"].items():
        monkeypatch.setenv(k, v)
    data_path = f"s3://{BUCKET}/runs/one"  # no trailing slash: the catalog adds it
    with Catalog(tmp_path / "run", data_path=data_path, bulk_rows=10) as cat:
        assert cat.add_problems([_problem(f"p{i}") for i in range(40)]) == 40
        v0 = cat.commit_round(0, {"pass_rate": 1.0}, config_hash="cfg")
        assert cat.add_problems([{**_problem("late"), "round_introduced": 1}]) == 1
        files = _data_files(cat)

    # What DuckLake wrote is in the bucket, under the prefix, and nowhere in the workdir.
    assert files, "no data file: everything was inlined into the metadata"
    assert all(f.startswith(f"{data_path}/") for f in files), files
    assert {f.removeprefix(f"s3://{BUCKET}/") for f in files} <= _objects(s3_server["client"], "runs/one/")
    assert not list((tmp_path / "run").rglob("*.parquet"))

    # The workdir alone finds the data (location.json), a snapshot reader too, and time travel works.
    with Catalog.for_workdir(tmp_path / "run", snapshot=True) as cat:
        assert cat.data_path == f"{data_path}/"
        assert [(r.round, r.snapshot_id) for r in cat.status().rounds] == [(0, v0)]
        assert cat.read("problems", round=0).num_rows == 40
        assert cat.read("problems").num_rows == 41


def test_a_missing_bucket_is_named_when_the_catalog_opens(s3_server, tmp_path, monkeypatch):
    for k, v in s3_server["env"].items():
        monkeypatch.setenv(k, v)
    with pytest.raises(CatalogError) as err:
        Catalog(tmp_path / "run", data_path="s3://no-such-bucket/run/")
    message = str(err.value)
    assert "catalog data_path s3://no-such-bucket/run/" in message
    assert "NoSuchBucket" in message and s3_server["endpoint"] in message
    assert SECRET not in message


def _tables(workdir: Path) -> dict[str, list[dict]]:
    """Every dataset table of a run, rows sorted by their key (the rounds table holds commit times
    and snapshot ids, which differ between runs; its round numbers are compared)."""
    from stillhouse.storage import schema as S

    out = {}
    with Catalog.for_workdir(workdir, snapshot=True) as cat:
        for spec in (S.PROBLEMS, S.SAMPLES, S.EVAL_RESULTS, S.SPLIT_LABELS, S.SYNTHESIS_RECORDS):
            rows = cat.read(spec.name).to_pylist()
            out[spec.name] = sorted(rows, key=lambda r: tuple(str(r[k]) for k in spec.key))
        out["rounds"] = sorted(r.round for r in cat.status().rounds if r.status == "committed")
    return out


@pytest.mark.slow
def test_the_whole_smoke_flow_with_its_catalog_data_in_a_bucket(s3_server, tmp_path, models_dir, monkeypatch):
    """`stillhouse run` of the smoke config (2 rounds) with catalog.data_path on the bucket: the
    catalog's data files are objects in the bucket and none is in the workdir; the dataset equals
    that of the same run with local data; the secret is in no file the runs wrote. (A rerun that
    adds nothing is tested on the PostgreSQL catalog, tests/server/test_postgres.py: on S3 it
    would cost another ~50 s here for what the catalog keeps in its metadata, not in the bucket.)"""
    import yaml

    base = yaml.safe_load(SMOKE.read_text())
    data_path = f"s3://{BUCKET}/runs/smoke/"
    configs = {}
    for name, catalog in (("s3", {"data_path": data_path}), ("local", {})):
        path = tmp_path / f"smoke-{name}.yaml"
        path.write_text(yaml.safe_dump({**base, "workdir": str(tmp_path / name), "catalog": catalog}))
        configs[name] = path
    env = {**child_env(tmp_path / "prefect-home", models_dir, None), **s3_server["env"]}
    procs = Procs(tmp_path / "logs", env)
    cli = [sys.executable, "-m", "stillhouse.flows.cli", "run"]
    for k, v in s3_server["env"].items():
        monkeypatch.setenv(k, v)  # this process reads the catalog too
    try:
        out = procs.run(*cli, str(configs["s3"]), timeout=600)
        s3_run = _tables(tmp_path / "s3")
        with Catalog.for_workdir(tmp_path / "s3", snapshot=True) as cat:
            files = _data_files(cat)
        objects = _objects(s3_server["client"], "runs/smoke/")
        assert s3_run["rounds"] == [0, 1] and all(s3_run.values()), {k: len(v) for k, v in s3_run.items()}
        assert files and {f.removeprefix(f"s3://{BUCKET}/") for f in files} <= objects
        assert not list((tmp_path / "s3" / "catalog").rglob("*.parquet"))

        # Its own workdir, so its own step cache: every generation is computed again, and the
        # local catalog takes large batches through its pyarrow bulk path, not DuckDB's INSERT.
        out += procs.run(*cli, str(configs["local"]), timeout=600)
        assert _tables(tmp_path / "local") == s3_run
    finally:
        procs.stop_all()
    # Nothing the run wrote holds the secret: logs, the workdirs, Prefect's database (flow-run
    # parameters and logs). moto's own log is left out (it is the server's side).
    leaked = [p for p in tmp_path.rglob("*") if p.is_file() and p.name != "moto.log" and SECRET.encode() in p.read_bytes()]
    assert not leaked and SECRET not in out, leaked
