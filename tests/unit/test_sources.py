"""Problem sources: local files with column maps, the skip report, hf save_to_disk, dedup, limit."""

import csv
import json
import logging
import re
import typing

import pytest

from stillhouse.tasks.config import ColumnMap, SourceConfig
from stillhouse.tasks.problems import problem_id
from stillhouse.tasks.sources import (
    ARITHMETIC_STORIES,
    LOADERS,
    SkippedRow,
    SourceError,
    arithmetic_split,
    gsm_symbolic_split,
    load_problems,
    normalize_reference,
)

pytestmark = pytest.mark.unit

MAPPED = ColumnMap(question="problem", answer="solution", id="uid")
ROWS = [
    {"problem": "Tom has 3 apples and buys 4 more. How many?", "solution": "3+4=7\n#### 7", "uid": "a1"},
    {"problem": "A shop sells 1,234 pens a day. How many in 2 days?", "solution": "#### 2,468", "uid": "a2"},
    {"problem": "What is half of 5?", "solution": "2.5", "uid": "a3"},
]


def write_jsonl(path, lines):
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


def write_csv(path, rows, fields):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    return path


def write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


WRITERS = {
    "jsonl": lambda p, rows: write_jsonl(p, rows),
    "csv": lambda p, rows: write_csv(p, rows, list(rows[0])),
    "parquet": write_parquet,
}


# --------------------------------------------------------------------------- normalize_reference


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 72", "72"),
        ("#### 1,234", "1234"),
        ("#### 1,234,567", "1234567"),
        ("####  -5 ", "-5"),
        ("#### $1,000", "1000"),
        ("-$1,000.50", "-1000.50"),
        ("$ 18", "18"),
        ("$5$", "5"),  # a number in inline LaTeX math
        ("12.50", "12.50"),  # decimals are kept as written
        ("3.0", "3.0"),  # no guessing that 3.0 means 3
        ("+7", "7"),
        ("1 234", "1234"),
        ("12\u00a0000", "12000"),
        ("12 34", "12 34"),  # not groups of three: two numbers, left alone
        ("- 5", "-5"),
        ("\u22123", "-3"),  # unicode minus
        ("0.5", "0.5"),
        ("1,23", "1,23"),  # not a thousands separator: left alone
        ("3, 4", "3, 4"),  # a list, not a number
        ("$\\frac{1}{2}$", "$\\frac{1}{2}$"),  # LaTeX keeps its dollars
        ("C(10, 5), or equivalently 252", "C(10, 5), or equivalently 252"),
        ("10%", "10%"),
        ("  x = 5 ", "x = 5"),
        ("a #### b #### 9", "9"),  # the last marker wins
        ("rationale only ####", ""),
    ],
)
def test_normalize_reference(raw, expected):
    assert normalize_reference(raw) == expected


# --------------------------------------------------------------------------- local files


@pytest.mark.parametrize("kind", ["jsonl", "csv", "parquet"])
def test_file_with_column_map(tmp_path, kind):
    path = WRITERS[kind](tmp_path / f"my_set.{kind}", ROWS)
    res = load_problems([SourceConfig(kind=kind, path=str(path), columns=MAPPED, split="eval")])
    assert res.skipped == []
    assert [p.answer for p in res.problems] == ["7", "2468", "2.5"]
    assert [p.question for p in res.problems] == [r["problem"] for r in ROWS]
    assert {p.source for p in res.problems} == {"my_set"}  # the file stem by default
    assert {p.split for p in res.problems} == {"eval"}
    assert [json.loads(p.meta) for p in res.problems] == [
        {"row": 1, "upstream_id": "a1"}, {"row": 2, "upstream_id": "a2"}, {"row": 3, "upstream_id": "a3"}
    ]
    assert res.problems[0].id == problem_id(ROWS[0]["problem"], "7")


def test_name_overrides_source_label(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"question": "1+1?", "answer": "2"}])
    (p,) = load_problems([SourceConfig(kind="jsonl", path=str(path), name="seed-set")]).problems
    assert p.source == "seed-set" and p.answer == "2" and p.split == "train"


def test_jsonl_skip_report(tmp_path, caplog):
    long_answer = "9" * 201
    path = write_jsonl(tmp_path / "messy.jsonl", [
        {"question": "What is 2+2?", "answer": "4"},  # 1 ok
        {"answer": "5"},  # 2 no question key
        {"question": "What is 3+3?", "answer": ""},  # 3 empty answer
        '{"question": "broken", ',  # 4 invalid JSON
        "",  # 5 blank line: not a row
        {"question": "What is 4+4?", "answer": None},  # 6 null answer
        {"question": "   ", "answer": "1"},  # 7 whitespace question
        {"question": "Long?", "answer": long_answer},  # 8 over max_answer_chars
        {"question": "Only a rationale?", "answer": "so #### "},  # 9 empty once normalised
        [1, 2],  # 10 not an object
        {"question": {"nested": 1}, "answer": "1"},  # 11 not text
        {"question": "What is 5+5?", "answer": 10},  # 12 ok: numbers are text too
    ])
    with caplog.at_level(logging.WARNING, logger="stillhouse.tasks.sources"):
        res = load_problems([SourceConfig(kind="jsonl", path=str(path))])
    assert [(p.question, p.answer) for p in res.problems] == [("What is 2+2?", "4"), ("What is 5+5?", "10")]
    got = [(s.source, s.row, s.field, s.reason) for s in res.skipped]
    assert got[:3] == [("messy", 2, "question", "missing"), ("messy", 3, "answer", "empty")] + [
        ("messy", 4, None, got[2][3])
    ]
    assert got[2][3].startswith("invalid JSON")
    assert got[3:] == [
        ("messy", 6, "answer", "missing"),
        ("messy", 7, "question", "empty"),
        ("messy", 8, "answer", "too long (201 > max_answer_chars=200)"),
        ("messy", 9, "answer", "empty after normalisation"),
        ("messy", 10, None, "not a JSON object (list)"),
        ("messy", 11, "question", "not text (dict)"),
    ]
    (record,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "messy" in record.getMessage() and "9 rows skipped" in record.getMessage()


def test_csv_skip_report_uses_data_row_numbers(tmp_path):
    path = write_csv(tmp_path / "t.csv", [
        {"q": "What is 1+1?", "a": "2"},
        {"q": "", "a": "3"},
        {"q": "What is 2+2?", "a": ""},
        {"q": "What is 3+3?", "a": "#### 6"},
    ], ["q", "a"])
    res = load_problems([SourceConfig(kind="csv", path=str(path), columns=ColumnMap(question="q", answer="a"))])
    assert [p.answer for p in res.problems] == ["2", "6"]
    assert res.skipped == [SkippedRow("t", 2, "question", "empty"), SkippedRow("t", 3, "answer", "empty")]


def test_parquet_nulls_are_reported(tmp_path):
    path = write_parquet(tmp_path / "n.parquet", [
        {"question": "What is 1+1?", "answer": "2"}, {"question": None, "answer": "3"},
    ])
    res = load_problems([SourceConfig(kind="parquet", path=str(path))])
    assert len(res.problems) == 1
    assert res.skipped == [SkippedRow("n", 2, "question", "missing")]


@pytest.mark.parametrize("kind", ["jsonl", "csv", "parquet"])
def test_unknown_column_is_a_clear_error(tmp_path, kind):
    path = WRITERS[kind](tmp_path / f"f.{kind}", ROWS)
    with pytest.raises(SourceError) as err:
        load_problems([SourceConfig(kind=kind, path=str(path), columns=ColumnMap(question="problem", answer="answer"))])
    msg = str(err.value)
    assert "'answer'" in msg and str(path) in msg
    assert "'problem', 'solution', 'uid'" in msg  # lists what is there


@pytest.mark.parametrize("kind", ["jsonl", "csv", "parquet", "hf"])
def test_unreadable_path_names_the_path(tmp_path, kind):
    missing = tmp_path / "nope" / f"data.{kind}"
    with pytest.raises(SourceError, match=str(missing)):
        load_problems([SourceConfig(kind=kind, path=str(missing))])


def test_corrupt_parquet_names_the_path(tmp_path):
    path = tmp_path / "bad.parquet"
    path.write_text("not parquet")
    with pytest.raises(SourceError, match="bad.parquet"):
        load_problems([SourceConfig(kind="parquet", path=str(path))])


# --------------------------------------------------------------------------- hf save_to_disk


def test_hf_saved_dataset_round_trip_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets

    rows = {"problem": [r["problem"] for r in ROWS], "solution": [r["solution"] for r in ROWS],
            "uid": [r["uid"] for r in ROWS]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "single"))
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict(rows),
        "test": datasets.Dataset.from_dict({k: v[:1] for k, v in rows.items()}),
    }).save_to_disk(str(tmp_path / "dict"))

    single = load_problems([SourceConfig(kind="hf", path=str(tmp_path / "single"), columns=MAPPED)])
    assert [p.answer for p in single.problems] == ["7", "2468", "2.5"]
    assert single.problems[0].source == "single"
    assert json.loads(single.problems[1].meta) == {"row": 2, "upstream_id": "a2"}

    test = load_problems([SourceConfig(kind="hf", path=str(tmp_path / "dict"), hf_split="test", columns=MAPPED)])
    assert [p.id for p in test.problems] == [single.problems[0].id]
    with pytest.raises(SourceError, match="validation"):
        load_problems([SourceConfig(kind="hf", path=str(tmp_path / "dict"), hf_split="validation", columns=MAPPED)])
    with pytest.raises(SourceError, match="'question'"):
        load_problems([SourceConfig(kind="hf", path=str(tmp_path / "single"))])


# --------------------------------------------------------------------------- ids, dedup, limit


def test_ids_stable_across_calls(tmp_path):
    path = WRITERS["jsonl"](tmp_path / "s.jsonl", ROWS)
    cfg = SourceConfig(kind="jsonl", path=str(path), columns=MAPPED)
    first, second = load_problems([cfg]), load_problems([cfg])
    assert [p.id for p in first.problems] == [p.id for p in second.problems]
    assert [p.id for p in first.problems] == [problem_id(p.question, p.answer) for p in first.problems]


def test_dedup_within_and_across_sources(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [
        {"question": "What is 1+1?", "answer": "2"},
        {"question": "What is  1+1? ", "answer": "#### 2"},  # same after normalisation
        {"question": "What is 2+2?", "answer": "4"},
    ])
    b = write_csv(tmp_path / "b.csv", [
        {"question": "What is 3+3?", "answer": "6"}, {"question": "What is 2+2?", "answer": "4"},
    ], ["question", "answer"])
    res = load_problems([
        SourceConfig(kind="jsonl", path=str(a)), SourceConfig(kind="csv", path=str(b), split="eval"),
    ])
    assert [(p.question, p.source, p.split) for p in res.problems] == [
        ("What is 1+1?", "a", "train"), ("What is 2+2?", "a", "train"), ("What is 3+3?", "b", "eval"),
    ]
    assert [(s.source, s.row, s.field) for s in res.skipped] == [("a", 2, "id"), ("b", 2, "id")]
    assert "source 'a'" in res.skipped[1].reason and "train problem" in res.skipped[1].reason
    assert res.of_split("eval") == [res.problems[2]]


def test_limit_is_a_seeded_shuffle(tmp_path):
    rows = [{"question": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(50)]
    path = write_jsonl(tmp_path / "many.jsonl", rows)

    def ids(**kw):
        return [p.id for p in load_problems([SourceConfig(kind="jsonl", path=str(path), **kw)]).problems]

    everything = ids()
    assert len(everything) == 50 and len(ids(limit=10)) == 10
    assert ids(limit=10, seed=3) == ids(limit=10, seed=3)
    assert ids(limit=10, seed=3) != ids(limit=10, seed=4)
    assert ids(limit=10) != everything[:10]  # shuffled, not the head of the file
    assert ids(limit=100) == everything


def test_every_kind_has_a_loader():
    kinds = typing.get_args(SourceConfig.model_fields["kind"].annotation)
    assert set(LOADERS) == set(kinds)


def test_gsm_symbolic_split_is_by_template_and_stable():
    split = gsm_symbolic_split(range(100), seed=0, eval_templates=20)
    assert sum(v == "eval" for v in split.values()) == 20
    assert split == gsm_symbolic_split(range(100), seed=0, eval_templates=20)
    assert split != gsm_symbolic_split(range(100), seed=1, eval_templates=20)
    # Adding templates never reorders the existing ones, so eval templates stay eval unless a new
    # template takes their place.
    grown = gsm_symbolic_split(range(120), seed=0, eval_templates=20)
    moved = [t for t in range(100) if split[t] == "train" and grown[t] == "eval"]
    assert moved == []
    assert set(gsm_symbolic_split(range(5), 0, 10).values()) == {"eval"}
    assert set(gsm_symbolic_split(range(5), 0, 0).values()) == {"train"}


def test_hf_hub_path_on_a_local_dataset_folder(tmp_path, monkeypatch):
    # The hub branch (load_dataset(dataset, subset, split=...)) run offline: load_dataset also
    # takes a local folder of data files, which needs no hub.
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    folder = tmp_path / "hub_like"
    folder.mkdir()
    write_jsonl(folder / "test.jsonl", [{"question": r["problem"], "answer": r["solution"]} for r in ROWS])
    res = load_problems([SourceConfig(kind="hf", dataset=str(folder), hf_split="test")])
    assert [p.answer for p in res.problems] == ["7", "2468", "2.5"]
    assert res.problems[0].source == str(folder)


# --------------------------------------------------------------------------- arithmetic


def arithmetic(**kw):
    return load_problems([SourceConfig(kind="arithmetic", **{"eval_templates": 4, **kw})])


def test_arithmetic_split_is_by_story_and_answers_are_integers():
    res = arithmetic(instances_per_template=3)
    assert res.skipped == []
    stories = lambda ps: {json.loads(p.meta)["template_id"] for p in ps}  # noqa: E731
    train, evals = res.of_split("train"), res.of_split("eval")
    assert len(stories(evals)) == 4 and len(stories(train)) == len(ARITHMETIC_STORIES) - 4
    assert stories(train).isdisjoint(stories(evals))
    assert len(res.problems) == 3 * len(ARITHMETIC_STORIES)
    assert all(re.fullmatch(r"[1-9]\d*", p.answer) for p in res.problems)
    assert {p.source for p in res.problems} == {"arithmetic"}
    assert all(p.question.endswith("?") for p in res.problems)
    # The same story order as gsm_symbolic's split function, on story ids.
    assert arithmetic_split(0, 4) == gsm_symbolic_split([s.id for s in ARITHMETIC_STORIES], 0, 4)


@pytest.mark.parametrize(
    "difficulty",
    [
        {"steps": 1, "operations": ["add", "sub"], "max_operand": 10},
        {"steps": 2, "operations": ["add", "sub"], "max_operand": 20},
        {"steps": 2, "operations": ["add", "sub", "mul"], "max_operand": 6},
        {"steps": 1, "operations": ["mul"], "max_operand": 5},
        {"steps": 3, "operations": ["sub"], "max_operand": 3},
    ],
)
def test_arithmetic_answers_follow_the_operands(difficulty):
    res = arithmetic(instances_per_template=4, **difficulty)
    top = difficulty["max_operand"]
    for p in res.problems:
        meta = json.loads(p.meta)
        ops, operands = meta["operations"], meta["operands"]
        assert len(ops) == difficulty["steps"]
        assert set(ops) <= set(difficulty["operations"]) | {"add"}  # 'sub' with too little left adds
        assert "mul" not in ops[1:], "mul is only ever the first step"
        value = operands[0] * operands[1] if ops[0] == "mul" else operands[0]
        for op, b in zip(ops[1:] if ops[0] == "mul" else ops, operands[2:] if ops[0] == "mul" else operands[1:]):
            value = value + b if op == "add" else value - b
        assert int(p.answer) == value >= 1
        assert all(2 <= x <= top for x in operands), (p.question, operands)
        for n in operands:  # every operand is written in the question
            assert re.search(rf"\b{n}\b", p.question)


def test_arithmetic_is_seeded_and_difficulty_changes_the_draws():
    first, second = arithmetic(seed=3), arithmetic(seed=3)
    assert [(p.id, p.question) for p in first.problems] == [(p.id, p.question) for p in second.problems]
    assert [p.id for p in arithmetic(seed=4).problems] != [p.id for p in first.problems]
    assert [p.id for p in arithmetic(seed=3, max_operand=20).problems] != [p.id for p in first.problems]
    # One more instance per story keeps the earlier instances (each story has its own generator).
    grown = arithmetic(seed=3, instances_per_template=2)
    assert {p.id for p in first.problems} <= {p.id for p in grown.problems}


def test_arithmetic_tiny_range_reports_missing_instances(caplog):
    # max_operand=3, one add step: start 3, operand 2 or 3 -> only a few distinct questions per
    # item/name, so asking for many instances gives fewer, with a warning, never a hang.
    with caplog.at_level(logging.WARNING, logger="stillhouse.tasks.sources"):
        res = arithmetic(max_operand=3, operations=["add"], instances_per_template=500)
    assert 0 < len(res.problems) < 500 * len(ARITHMETIC_STORIES)
    assert "distinct instances" in caplog.text


def test_arithmetic_config_rejects_mul_only_multistep():
    from stillhouse.tasks.config import ConfigError, parse_config

    with pytest.raises(ConfigError, match="mul"):
        parse_config({
            "problems": [{"kind": "arithmetic", "operations": ["mul"], "steps": 2}],
            "teacher": {"name_or_path": "t"}, "student": {"model": {"name_or_path": "s"}},
        })
    SourceConfig(kind="arithmetic", operations=["mul"], steps=1)  # one step of mul is fine


# --------------------------------------------------------------------------- limits (issue 16)


def test_a_5001_digit_json_answer_is_a_skipped_row_not_a_value_error(tmp_path, caplog):
    """json.loads raised "Exceeds the limit (4300 digits)" out of the loader, naming no file or row."""
    path = tmp_path / "big.jsonl"
    path.write_text(
        '{"question": "What is 1+1?", "answer": 2}\n'
        '{"question": "How big?", "answer": ' + "9" * 5001 + "}\n"
        '{"question": "How big as text?", "answer": "' + "9" * 5001 + '"}\n'
        + "[" * 100_000 + "\n"
    )
    with caplog.at_level(logging.WARNING):
        res = load_problems([SourceConfig(kind="jsonl", path=str(path))])
    assert [p.answer for p in res.problems] == ["2"]
    assert [(s.row, s.field) for s in res.skipped] == [(2, "answer"), (3, "answer"), (4, None)]
    assert res.skipped[0].reason == "too long (5001 > max_answer_chars=200)"
    assert res.skipped[2].reason == "invalid JSON: nested too deeply"
    assert str(path) in caplog.text  # the file, not only the source label, is named


@pytest.mark.parametrize("kind", ["jsonl", "csv", "parquet"])
def test_question_length_and_number_size_limits_name_row_and_field(tmp_path, kind):
    rows = [
        {"question": "What is 1+1?", "answer": "2"},
        {"question": "Q " * 600_000, "answer": "3"},  # the 1.2 MB question of the issue
        {"question": "What is " + "7" * 150 + " + 1?", "answer": "4"},
        {"question": "What is 2+2?", "answer": "4"},
    ]
    path = WRITERS[kind](tmp_path / f"lim.{kind}", rows)
    res = load_problems([SourceConfig(kind=kind, path=str(path))])
    assert [p.question for p in res.problems] == ["What is 1+1?", "What is 2+2?"]
    assert [(s.source, s.row, s.field) for s in res.skipped] == [("lim", 2, "question"), ("lim", 3, "question")]
    assert "max_question_chars=8000" in res.skipped[0].reason
    assert "150 digits > max_number_digits=100" in res.skipped[1].reason
    # The limits are configurable.
    res = load_problems([SourceConfig(kind=kind, path=str(path), max_question_chars=2_000_000, max_number_digits=200)])
    assert len(res.problems) == 4


@pytest.mark.parametrize(
    "column, values",
    [
        ("question", [["a", "b"], ["c"]]),  # list
        ("answer", [b"\x00\x01", b"\x02"]),  # binary
        ("question", [{"text": "a"}, {"text": "b"}]),  # struct
    ],
)
def test_parquet_columns_that_are_not_text_are_one_clear_error(tmp_path, column, values):
    rows = [{"question": "What is 1+1?", "answer": "2"}, {"question": "What is 2+2?", "answer": "4"}]
    rows = [{**r, column: v} for r, v in zip(rows, values)]
    path = write_parquet(tmp_path / "typed.parquet", rows)
    with pytest.raises(SourceError) as err:
        load_problems([SourceConfig(kind="parquet", path=str(path))])
    msg = str(err.value)
    assert f"column {column!r} ({column})" in msg and str(path) in msg and "not text or numbers" in msg


def test_numeric_parquet_answers_still_load(tmp_path):
    path = write_parquet(tmp_path / "num.parquet", [{"question": "What is 1+1?", "answer": 2},
                                                    {"question": "What is 2+2?", "answer": 4}])
    assert [p.answer for p in load_problems([SourceConfig(kind="parquet", path=str(path))]).problems] == ["2", "4"]
