"""The DuckLake catalog: rounds as versions, time travel, diffs, lineage, idempotence, export."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

import stillhouse.storage.catalog as catalog_mod
from stillhouse.storage import schema as S
from stillhouse.storage.catalog import Catalog, CatalogError, CatalogLockedError, RoundCommittedError

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]


def problem(
    pid: str, *, parent: str | None = None, op: str = "seed", rnd: int = 0, split: str = "train"
) -> dict:
    return {
        "problem_id": pid,
        "question": f"What is {pid}?",
        "answer": str(len(pid)),
        "source": "unit",
        "split": split,
        "parent_id": parent,
        "operation": op,
        "round_introduced": rnd,
        "meta": {"origin": pid},
    }


def sample(pid: str, rnd: int, k: int, *, correct: bool = True) -> dict:
    return {
        "sample_id": f"{pid}/r{rnd}/{k}/teacher",
        "problem_id": pid,
        "round": rnd,
        "sample_index": k,
        "teacher": "teacher",
        "prompt": f"Solve: What is {pid}?",
        "response": f"Reasoning {k}... #### {len(pid)}",
        "extracted": str(len(pid)),
        "correct": correct,
        "format_ok": True,
        "reward": 1.0 if correct else 0.0,
        "advantage": 0.5 if correct else -0.5,
        "weight": 0.5 if correct else 0.0,
        "error": None,
        "sampling_params": {"temperature": 0.7, "max_new_tokens": 64},
        "prompt_tokens": 10,
        "completion_tokens": 20 + k,
        "finish_reason": "stop",
    }


SEEDS = ["s0", "s1", "s2"]
ROUND1 = ["h0", "g0"]  # h0 = harder(s0); g0 = similar(h0): s0's grandchild


def build_two_rounds(workdir: Path, **kw) -> dict[str, int]:
    with Catalog(workdir, **kw) as cat:
        assert cat.add_problems([problem(p) for p in SEEDS] + [problem("e0", split="eval")]) == 4
        assert (
            cat.add_samples([sample(p, 0, k, correct=k == 0) for p in SEEDS for k in range(2)]) == 6
        )
        s0 = cat.commit_round(0, {"pass_rate": 0.5}, config_hash="cfg")
        cat.add_eval_results(
            [
                {
                    "round": 0,
                    "student_key": "k0",
                    "eval_set": "gsm",
                    "problem_id": "e0",
                    "sample_index": 0,
                    "response": "#### 2",
                    "extracted": "2",
                    "correct": True,
                }
            ]
        )
        cat.add_split_labels(
            [
                {
                    "round": 0,
                    "student_key": "k0",
                    "problem_id": p,
                    "pass_rate": 1.0 if p == "s0" else 0.0,
                    "label": "easy" if p == "s0" else "hard",
                }
                for p in SEEDS
            ]
        )
        # The grandchild's parent arrives in the same batch.
        assert (
            cat.add_problems(
                [
                    problem("h0", parent="s0", op="harder", rnd=1),
                    problem("g0", parent="h0", op="similar", rnd=1),
                ]
            )
            == 2
        )
        assert cat.add_samples([sample(p, 1, k) for p in SEEDS + ROUND1 for k in range(2)]) == 10
        s1 = cat.commit_round(1, {"pass_rate": 0.7}, config_hash="cfg")
    return {"s0": s0, "s1": s1}


@pytest.fixture(scope="module")
def two_rounds(tmp_path_factory) -> tuple[Path, dict[str, int]]:
    workdir = tmp_path_factory.mktemp("two-rounds")
    return workdir, build_two_rounds(workdir)


@pytest.fixture()
def run(two_rounds, tmp_path: Path) -> tuple[Path, dict[str, int]]:
    """A private copy of the two-round catalog (copying is faster than rebuilding it)."""
    template, snaps = two_rounds
    workdir = tmp_path / "run"
    shutil.copytree(template, workdir)
    return workdir, snaps


def data_files(workdir: Path) -> set[str]:
    return {str(p) for p in (workdir / "catalog" / "data").rglob("*.parquet")}


def ids(table: pa.Table, col: str = "problem_id") -> list:
    return sorted(table[col].to_pylist())


# ---------------------------------------------------------------------------- versions


def test_round_versions_are_snapshots_with_messages(run):
    workdir, snaps = run
    with Catalog(workdir) as cat:
        assert cat.round_snapshot(0) == snaps["s0"] < snaps["s1"] == cat.round_snapshot(1)
        log = {r["snapshot_id"]: r for r in cat.snapshots().to_pylist()}
        assert log[snaps["s0"]]["commit_message"] == "round 0"
        assert log[snaps["s1"]]["author"] == "stillhouse"
        # The version includes its own rounds row: time travel to it shows the round committed.
        assert cat.read("rounds", 0)["round"].to_pylist() == [0]
        assert cat.read("rounds", 0)["snapshot_id"].to_pylist() == [snaps["s0"]]


def test_time_travel_to_round0_shows_only_round0_rows(run):
    workdir, _ = run
    with Catalog(workdir) as cat:
        assert ids(cat.read("problems", 0)) == ["e0", "s0", "s1", "s2"]
        assert set(cat.read("samples", 0)["round"].to_pylist()) == {0}
        assert cat.read("samples", 0).num_rows == 6
        assert cat.read("eval_results", 0).num_rows == 0  # written after round 0's commit
        assert cat.read("eval_results", 1).num_rows == 1
        assert ids(cat.read("problems")) == ["e0", "g0", "h0", "s0", "s1", "s2"]
        r1 = cat.samples_for_round(1)
        assert r1.num_rows == 10 and set(r1["round"].to_pylist()) == {1}
        assert r1.schema == S.SAMPLES.schema
        ts = cat.training_set(0)
        assert ts.num_rows == 6 and {"question", "answer"} <= set(ts.column_names)
        assert ts.filter(pc.equal(ts["problem_id"], "s1"))["question"][0].as_py() == "What is s1?"
        with pytest.raises(KeyError, match="round 7 is not committed"):
            cat.read("samples", 7)


def test_diff_lists_exactly_the_added_problems(run):
    workdir, snaps = run
    with Catalog(workdir) as cat:
        d = cat.diff(0, 1)
        assert d.problems_added == ["g0", "h0"]
        assert d.problems_removed == []
        assert d.added_by_operation == {"harder": 1, "similar": 1}
        assert d.samples_added_by_round == {1: 10}
        assert (d.from_snapshot, d.to_snapshot) == (snaps["s0"], snaps["s1"])
        # The change feed agrees with set difference by time travel.
        before, after = set(ids(cat.read("problems", 0))), set(ids(cat.read("problems", 1)))
        assert sorted(after - before) == d.problems_added
        back = cat.diff(1, 0)
        assert back.problems_removed == ["g0", "h0"] and back.problems_added == []
        assert back.samples_removed_by_round == {1: 10}
        same = cat.diff(1, 1)
        assert same.problems_added == [] and same.samples_added_by_round == {}


def test_lineage_of_a_grandchild_reaches_the_seed(run):
    workdir, _ = run
    with Catalog(workdir) as cat:
        chain = cat.lineage("g0")
        assert [r["problem_id"] for r in chain] == ["g0", "h0", "s0"]
        assert [r["operation"] for r in chain] == ["similar", "harder", "seed"]
        assert chain[-1]["parent_id"] is None and json.loads(chain[0]["meta"]) == {"origin": "g0"}
        assert [r["problem_id"] for r in cat.lineage("s1")] == ["s1"]
        with pytest.raises(KeyError):
            cat.lineage("g0", round=0)  # did not exist yet in round 0's version
        with pytest.raises(KeyError):
            cat.lineage("nope")


# ---------------------------------------------------------------------------- idempotence


def test_reinsert_adds_nothing_and_creates_no_snapshot_or_file(run):
    workdir, _ = run
    with Catalog(workdir) as cat:
        snap, files = cat.current_snapshot(), data_files(workdir)
        assert cat.add_problems([problem(p) for p in SEEDS]) == 0
        assert cat.add_samples([sample(p, 1, k) for p in SEEDS + ROUND1 for k in range(2)]) == 0
        # Same rows as an Arrow table, and the round-0 samples (a committed round) too.
        assert (
            cat.add_samples(pa.Table.from_pylist([sample("s0", 0, 0) | {"sampling_params": "{}"}]))
            == 0
        )
        assert (
            cat.add_split_labels(
                [{"round": 0, "student_key": "k0", "problem_id": "s0", "pass_rate": 1.0, "label": "easy"}]
            )
            == 0
        )
        assert cat.current_snapshot() == snap
        assert data_files(workdir) == files
        # Repeats inside one batch collapse to one row (first wins).
        first, again = problem("n0", rnd=2), problem("n0", rnd=2) | {"question": "other"}
        assert cat.add_problems([first, again]) == 1
        assert cat.read("problems").filter(pc.equal(pc.field("problem_id"), "n0"))[
            "question"
        ].to_pylist() == ["What is n0?"]


def test_commit_round_resume_and_conflicts(run):
    workdir, snaps = run
    with Catalog(workdir) as cat:
        snap = cat.current_snapshot()
        # Resume: same config -> same version, nothing written (first metrics kept).
        assert cat.commit_round(1, {"pass_rate": 0.9}, config_hash="cfg") == snaps["s1"]
        assert cat.current_snapshot() == snap
        with pytest.raises(RoundCommittedError, match="config_hash"):
            cat.commit_round(1, {}, config_hash="other")
        with pytest.raises(RoundCommittedError, match="already committed"):
            cat.add_samples([sample("s0", 1, 5)])  # new sample for a committed round
        with pytest.raises(RoundCommittedError):
            cat.add_problems([problem("late", rnd=0)])
        assert cat.current_snapshot() == snap
        # A later round's data is fine; commits go forward only.
        assert cat.add_samples([sample("s0", 2, 0)]) == 1
        assert cat.commit_round(2, {}, config_hash="cfg") == cat.current_snapshot()
        assert [r.round for r in cat.status().rounds] == [0, 1, 2]


def test_commit_rounds_in_order(tmp_path):
    with Catalog(tmp_path) as cat:
        cat.commit_round(3, {}, "c")
        with pytest.raises(ValueError, match="in order"):
            cat.commit_round(2, {}, "c")


# ---------------------------------------------------------------------------- validation


def test_bad_rows_raise_naming_the_field_and_leave_the_catalog_unchanged(run):
    workdir, _ = run
    with Catalog(workdir) as cat:
        snap, files = cat.current_snapshot(), data_files(workdir)
        n_problems = cat.read("problems").num_rows

        no_question = [{k: v for k, v in problem("x1", rnd=2).items() if k != "question"}]
        with pytest.raises(ValueError, match=r"missing required column\(s\) \['question'\]"):
            cat.add_problems(no_question)
        null_question = [problem("x1", rnd=2), problem("x2", rnd=2) | {"question": None}]
        with pytest.raises(ValueError, match=r"problems\.question: null .* row 1"):
            cat.add_problems(null_question)
        with pytest.raises(ValueError, match=r"problems\.round_introduced: wrong type"):
            cat.add_problems([problem("x1") | {"round_introduced": "2"}])
        with pytest.raises(ValueError, match=r"problems\.round_introduced: wrong type"):
            cat.add_problems([problem("x1") | {"round_introduced": 2.5}])
        with pytest.raises(ValueError, match=r"problems\.split: value 'test' at row 0"):
            cat.add_problems([problem("x1", rnd=2, split="test")])
        with pytest.raises(ValueError, match=r"unknown column\(s\) \['questoin'\]"):
            cat.add_problems([problem("x1", rnd=2) | {"questoin": "typo"}])
        with pytest.raises(ValueError, match=r"parent_id: 'ghost'"):
            cat.add_problems([problem("x1", parent="ghost", op="harder", rnd=2)])
        with pytest.raises(ValueError, match=r"row 0 has operation 'seed'"):
            cat.add_problems([problem("x1", parent="s0", rnd=2)])
        with pytest.raises(ValueError, match=r"samples\.sampling_params: not JSON at row 0"):
            cat.add_samples([sample("s0", 2, 0) | {"sampling_params": "{bad"}])
        bad_arrow = pa.Table.from_pylist([sample("s0", 2, 0)]).set_column(
            2, "round", pa.array(["2"])
        )
        with pytest.raises(ValueError, match=r"samples\.round: wrong type string"):
            cat.add_samples(bad_arrow)
        # A bad row after good ones: nothing of the batch is written.
        with pytest.raises(ValueError, match=r"samples\.correct: null .* row 2"):
            cat.add_samples(
                [sample("s0", 2, 0), sample("s1", 2, 0), sample("s2", 2, 0) | {"correct": None}]
            )

        assert cat.current_snapshot() == snap
        assert data_files(workdir) == files
        assert cat.read("problems").num_rows == n_problems


def test_arrow_input_is_cast_within_type_families(tmp_path):
    rows = pa.Table.from_pylist([sample("s0", 0, k) | {"sampling_params": "{}"} for k in range(3)])
    rows = rows.set_column(2, "round", rows["round"].cast(pa.int32()))
    rows = rows.set_column(6, "response", rows["response"].cast(pa.large_string()))
    with Catalog(tmp_path) as cat:
        assert cat.add_samples(rows) == 3
        assert cat.read("samples")["round"].type == pa.int64()


# ---------------------------------------------------------------------------- export


def test_export_parquet_and_jsonl_round_trip(run, tmp_path):
    workdir, _ = run
    out = tmp_path / "exports"
    with Catalog(workdir) as cat:
        expected = cat.training_set(1).to_pylist()
        assert cat.export(1, out / "r1.parquet") == len(expected) == 10
        assert pq.read_table(out / "r1.parquet").to_pylist() == expected
        assert cat.export(1, out / "r1.jsonl") == 10
        lines = (out / "r1.jsonl").read_text().splitlines()
        assert [json.loads(line) for line in lines] == expected
        with pytest.raises(ValueError, match="unsupported suffix '.csv'"):
            cat.export(1, out / "r1.csv")
        with pytest.raises(KeyError):
            cat.export(9, out / "r9.parquet")
    assert sorted(p.name for p in out.iterdir()) == ["r1.jsonl", "r1.parquet"]  # no temp files


def test_export_works_on_a_read_only_catalog(run, tmp_path):
    workdir, _ = run
    with Catalog(workdir, read_only=True) as cat:
        assert cat.export(0, tmp_path / "r0.parquet") == 6
        with pytest.raises(CatalogError, match="read_only"):
            cat.add_problems([problem("z", rnd=2)])


# ---------------------------------------------------------------------------- durability


def test_reopening_from_disk_sees_everything(run):
    workdir, snaps = run
    with Catalog(workdir) as cat:
        status = cat.status()
        assert status.current_snapshot == snaps["s1"]  # nothing written after round 1's commit
        rounds = {r.round: r for r in status.rounds}
        assert (
            rounds[0].problems == 4 and rounds[0].samples == 6 and rounds[0].status == "committed"
        )
        assert rounds[1].problems == 6 and rounds[1].samples == 10
        assert rounds[1].snapshot_id == snaps["s1"] and rounds[1].config_hash == "cfg"
        assert cat.read("split_labels").num_rows == 3
        # An open round shows up once it has samples.
        cat.add_samples([sample("s0", 2, 0)])
        assert cat.status().rounds[-1].status == "open"


def test_moved_workdir_still_opens(tmp_path):
    build_two_rounds(tmp_path / "a")
    moved = tmp_path / "b"
    (tmp_path / "a").rename(moved)
    with Catalog(moved) as cat:
        assert cat.read("samples", 1).num_rows == 16


def test_catalog_elsewhere_is_found_from_the_workdir(tmp_path):
    # A catalog outside the workdir (as a PostgreSQL catalog or an object-store data path would
    # be): the run records where it is, so tools given only the workdir open the same catalog.
    shared = tmp_path / "shared"
    shared.mkdir()
    uri, data = str(shared / "meta.ducklake"), str(shared / "data") + "/"
    build_two_rounds(tmp_path / "run", catalog_uri=uri, data_path=data)
    assert (shared / "meta.ducklake").is_file()
    assert not (tmp_path / "run" / "catalog" / "metadata.ducklake").exists()
    with Catalog.for_workdir(tmp_path / "run", read_only=True) as cat:
        assert cat.catalog_uri == uri and cat.read("samples", 1).num_rows == 16
    # A workdir with the default catalog records nothing and opens as before.
    build_two_rounds(tmp_path / "local")
    assert not (tmp_path / "local" / "catalog" / catalog_mod.LOCATION_FILE).exists()
    with Catalog.for_workdir(tmp_path / "local", read_only=True) as cat:
        assert cat.read("samples", 1).num_rows == 16


def test_catalog_uri_with_a_password_is_refused(tmp_path):
    with pytest.raises(CatalogError, match="password"):
        Catalog(tmp_path, catalog_uri="postgres:dbname=lake host=db user=u password=hunter2")
    assert not (tmp_path / "catalog" / catalog_mod.LOCATION_FILE).exists()


def test_second_writer_fails_fast_with_a_clear_error(run):
    workdir, _ = run
    holder = textwrap.dedent(
        """
        import sys
        from stillhouse.storage.catalog import Catalog
        cat = Catalog(sys.argv[1])
        print("ready", flush=True)
        sys.stdin.read()
        cat.close()
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", holder, str(workdir)],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        with pytest.raises(CatalogLockedError, match=str(workdir)):
            Catalog(workdir)
    finally:
        proc.communicate("", timeout=30)
    with Catalog(workdir) as cat:  # lock released with the other process
        assert cat.read("problems").num_rows == 6


def _holder(workdir: Path, how: str) -> subprocess.Popen:
    """Another process that opens the catalog `how` and keeps it open until its stdin closes."""
    code = textwrap.dedent(
        f"""
        import sys
        from stillhouse.storage.catalog import Catalog
        cat = {how}
        print(cat.status().current_snapshot, flush=True)
        sys.stdin.read()
        print(cat.read("problems").num_rows, flush=True)
        cat.close()
        """
    )
    return subprocess.Popen([sys.executable, "-c", code, str(workdir)], cwd=REPO, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)


def test_a_snapshot_reader_never_keeps_a_writer_out(run):
    workdir, _ = run
    reader = _holder(workdir, "Catalog.for_workdir(sys.argv[1], snapshot=True)")
    try:
        seen = int(reader.stdout.readline())
        # The reader is open (and keeps reading below); the writer opens and commits at once.
        with Catalog(workdir) as cat:
            assert cat.add_problems([problem("late", rnd=2)]) == 1
            now = cat.status().current_snapshot
        assert now > seen
        out, _ = reader.communicate("", timeout=60)
        assert int(out) == 6  # the reader still reads the snapshot it took: without "late"
    finally:
        reader.kill()
    with Catalog.for_workdir(workdir, snapshot=True) as cat:  # a new snapshot sees the write
        assert cat.read("problems").num_rows == 7 and cat.status().current_snapshot == now
        with pytest.raises(CatalogError, match="read_only"):
            cat.add_problems([problem("never", rnd=2)])
    assert not list(Path(cat._attach_uri).parent.glob("*")), "the snapshot's copy is removed on close"


def test_a_snapshot_waits_for_a_writer_and_the_run_waits_for_a_reader(run):
    workdir, _ = run
    writer = _holder(workdir, "Catalog(sys.argv[1])")
    try:
        writer.stdout.readline()
        with pytest.raises(CatalogLockedError):  # no waiting asked for: at once, as before
            Catalog(workdir, read_only=True)
        threading.Timer(1.0, writer.stdin.close).start()
        with Catalog.for_workdir(workdir, snapshot=True) as cat:  # waits until the writer lets go
            assert cat.read("problems").num_rows == 6
        writer.wait(timeout=60)
    finally:
        writer.kill()
    # A reader's copy holds the file for a moment; a writer with lock_wait_s waits that out.
    code = textwrap.dedent(
        """
        import fcntl, os, sys
        from stillhouse.storage.catalog import _ofd_lock
        fd = os.open(sys.argv[1], os.O_RDONLY)
        _ofd_lock(fd, fcntl.F_RDLCK)  # what a snapshot holds while it copies
        print("locked", flush=True)
        sys.stdin.read()
        """
    )
    copier = subprocess.Popen([sys.executable, "-c", code, str(workdir / "catalog" / "metadata.ducklake")],
                              cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert copier.stdout.readline().strip() == "locked"
        with pytest.raises(CatalogLockedError):
            Catalog(workdir)
        threading.Timer(1.0, copier.stdin.close).start()
        with Catalog(workdir, lock_wait_s=30) as cat:
            assert cat.read("problems").num_rows == 6
    finally:
        copier.kill()


def test_no_snapshot_of_a_catalog_this_process_has_open(tmp_path):
    with Catalog(tmp_path):
        with pytest.raises(CatalogLockedError, match="already open in this process"):
            Catalog(tmp_path, snapshot=True)
    with Catalog(tmp_path, snapshot=True) as cat:
        assert cat.status().rounds == []


def test_second_open_in_the_same_process_fails_clearly(tmp_path):
    with Catalog(tmp_path):
        with pytest.raises(CatalogLockedError, match="already open in this process"):
            Catalog(tmp_path, read_only=True)
    with Catalog(tmp_path, read_only=True) as cat:  # released by close()
        assert cat.status().rounds == []


# ---------------------------------------------------------------------------- bulk path


def test_bulk_path_gives_the_same_catalog_as_insert(tmp_path):
    small, bulk = tmp_path / "insert", tmp_path / "bulk"
    build_two_rounds(small)
    build_two_rounds(bulk, bulk_rows=1)
    assert any("stillhouse-" in f for f in data_files(bulk))
    assert not any("stillhouse-" in f for f in data_files(small))
    with Catalog(small) as a, Catalog(bulk) as b:
        for table in S.TABLES:
            for rnd in (0, 1):
                if table == "rounds":
                    continue
                assert a.read(table, rnd).to_pylist() == b.read(table, rnd).to_pylist(), table
        assert a.diff(0, 1) == b.diff(0, 1)
        assert a.training_set(1).to_pylist() == b.training_set(1).to_pylist()


def test_failed_bulk_insert_leaves_no_file(tmp_path, monkeypatch):
    def write_then_crash(table, path, **kw):
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path)
        raise OSError("disk full (simulated)")

    with Catalog(tmp_path, bulk_rows=1) as cat:
        snap, files = cat.current_snapshot(), data_files(tmp_path)
        monkeypatch.setattr(catalog_mod, "write_parquet_atomic", write_then_crash)
        with pytest.raises(OSError, match="simulated"):
            cat.add_samples([sample("s0", 0, k) for k in range(4)])
        assert cat.current_snapshot() == snap and data_files(tmp_path) == files
        assert cat.read("samples").num_rows == 0


# ---------------------------------------------------------------------------- schema


def test_ddl_and_specs_agree():
    for spec in S.TABLES.values():
        sql = S.ddl(spec, "lake")
        for f in spec.schema:
            assert f.name in sql
        assert set(spec.key) <= set(spec.required)
    with pytest.raises(ValueError, match="unknown table"):
        S.spec_for("nope")


def test_bulk_files_follow_the_lakes_parquet_options(tmp_path):
    with Catalog(tmp_path, bulk_rows=1) as cat:
        cat.set_option("parquet_compression", "zstd")
        cat.set_option("parquet_row_group_size", 2048)
        cat.add_samples([sample("s0", 0, k) for k in range(3)])
        (path,) = [f for f in data_files(tmp_path) if "stillhouse-" in f]
        md = pq.ParquetFile(path).metadata
        assert md.row_group(0).column(0).compression == "ZSTD"
        assert cat.read("samples").num_rows == 3


# ---------------------------------------------------------------------------- synthesis records


def record(parent: str, *, kept: str | None = None, reason: str | None = None, rnd: int = 0) -> dict:
    return {
        "round": rnd, "synthesis_key": "sk0", "generation_key": f"synth/r{rnd}/harder/{parent}",
        "parent_id": parent, "operation": "harder", "seed": 7, "reply": f"Problem: harder {parent}?",
        "finish_reason": "stop", "question": None if reason in ("empty", "too_short") else f"harder {parent}?",
        "status": "kept" if kept else "dropped", "reason": reason,
        "detail": None if kept else f"why {parent}", "problem_id": kept, "answer": "3" if kept else None,
        "agreement": 0.75 if kept else 0.25, "votes": ["3", "3", "3", None],
    }


def test_synthesis_records_are_written_with_their_problems_and_explain_drops(tmp_path):
    with Catalog(tmp_path) as cat:
        cat.add_problems([problem(p) for p in SEEDS])
        cat.add_samples([sample(p, 0, 0) for p in SEEDS])
        cat.commit_round(0, {}, config_hash="cfg")
        cat.add_split_labels([{"round": 0, "student_key": "k0", "problem_id": p, "pass_rate": 1.0,
                               "label": "easy"} for p in SEEDS])
        assert cat.split_labels(0, "k0") == dict.fromkeys(SEEDS, "easy")
        assert cat.split_labels(0, "other") == {}
        records = [record("s0", kept="h0"), record("s1", reason="no_agreement"), record("s2", reason="too_short")]
        snap = cat.current_snapshot()
        kept = [problem("h0", parent="s0", op="harder", rnd=1)]
        assert cat.add_synthesis(kept, records) == (1, 3)
        assert cat.current_snapshot() == snap + 1  # problems and their records: one snapshot
        assert cat.add_synthesis(kept, records) == (0, 0)  # idempotent
        assert cat.current_snapshot() == snap + 1
        cat.add_samples([sample(p, 1, 0) for p in SEEDS + ["h0"]])
        cat.commit_round(1, {}, config_hash="cfg")
        got = cat.synthesis_records(0).to_pylist()
        assert [r["status"] for r in got] == ["kept", "dropped", "dropped"]
        assert json.loads(got[0]["votes"]) == ["3", "3", "3", None]
        d = cat.diff(0, 1)
        assert d.problems_added == ["h0"]
        assert d.dropped_by_reason == {"no_agreement": 1, "too_short": 1}
        assert [(x["parent_id"], x["reason"], x["detail"]) for x in d.dropped] == [
            ("s1", "no_agreement", "why s1"), ("s2", "too_short", "why s2")]
        assert cat.diff(0, 0).dropped == []
    with pytest.raises(ValueError, match="synthesis_records.status"):
        with Catalog(tmp_path) as cat:
            cat.add_synthesis([], [{**record("s0", rnd=2), "status": "maybe"}])


def test_read_only_open_of_a_catalog_without_synthesis_records(tmp_path):
    with Catalog(tmp_path) as cat:
        cat.add_problems([problem(p) for p in SEEDS])
        cat.con.execute(f"DROP TABLE {cat.alias}.synthesis_records")  # as written before the table existed
    with Catalog(tmp_path, read_only=True) as cat:
        assert cat.synthesis_records().num_rows == 0
        assert cat.read("problems").num_rows == len(SEEDS)
    with Catalog(tmp_path) as cat:  # a writable open adds it
        assert cat.synthesis_records().num_rows == 0 and "synthesis_records" in cat._existing_tables()
