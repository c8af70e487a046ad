"""The run config: every shipped config loads; bad configs name the field and the reason."""

from pathlib import Path

import pytest
import yaml

from stillhouse.tasks.config import ConfigError, RunConfig, load_config, parse_config

pytestmark = pytest.mark.unit

CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))
MINIMAL = {
    "problems": [{"kind": "jsonl", "path": "p.jsonl"}],
    "teacher": {"name_or_path": "t"},
    "student": {"model": {"name_or_path": "s"}},
}


def test_configs_exist():
    assert {p.name for p in CONFIGS} >= {"smoke.yaml", "demo.yaml", "gsm8k-qwen.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    assert cfg.rounds >= 1 and cfg.problems


def test_every_field_has_a_description():
    missing = []

    def walk(model, prefix):
        for name, field in model.model_fields.items():
            if not field.description:
                missing.append(prefix + name)
            ann = field.annotation
            if isinstance(ann, type) and hasattr(ann, "model_fields"):
                walk(ann, prefix + name + ".")

    walk(RunConfig, "")
    # list-of-model fields: the sub-models are checked on their own
    from stillhouse.tasks.config import ColumnMap, SourceConfig

    walk(SourceConfig, "problems[].")
    walk(ColumnMap, "problems[].columns.")
    assert not missing, f"fields without a description: {missing}"


def test_defaults_fill_a_minimal_config():
    cfg = parse_config(MINIMAL)
    assert cfg.sampling.n == 8
    assert cfg.weighting.scheme == "group_advantage"
    assert cfg.split.easy_threshold > cfg.split.hard_threshold


@pytest.mark.parametrize(
    "patch, path, reason",
    [
        ({"sampling": {"n": 0}}, "sampling.n", "greater than or equal to 1"),
        ({"weighting": {"scheme": "grpo"}}, "weighting.scheme", "group_advantage"),
        ({"problems": [{"kind": "csv"}]}, "problems.0", "needs `path`"),
        ({"student": {"model": {}}}, "student.model.name_or_path", "Field required"),
        ({"split": {"easy_threshold": 0.2, "hard_threshold": 0.5}}, "split", "below"),
        ({"sampling": {"temprature": 0.5}}, "sampling.temprature", "Extra inputs"),
    ],
)
def test_invalid_config_names_field_and_reason(patch, path, reason):
    with pytest.raises(ConfigError) as err:
        parse_config({**MINIMAL, **patch})
    msg = str(err.value)
    assert path in msg and reason in msg


def test_load_config_overrides_and_errors(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(MINIMAL))
    cfg = load_config(f, workdir=str(tmp_path / "w"), rounds=5)
    assert cfg.workdir == str(tmp_path / "w") and cfg.rounds == 5
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    f.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(f)
    f.write_text("teacher: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(f)


def test_config_is_frozen():
    cfg = parse_config(MINIMAL)
    with pytest.raises(Exception):
        cfg.sampling.n = 3  # type: ignore[misc]


# --------------------------------------------------------------------------- bounded YAML (issue 16)

SMOKE = (Path(__file__).parents[2] / "configs" / "smoke.yaml").read_text()


def _bomb(indent: str = "") -> str:
    """Billion laughs: 9 levels of 9 aliases, 9^9 values once expanded, 1 KB of YAML."""
    lines = [f'{indent}a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"{indent}a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    "name, text, reason",
    [
        # The bomb inside a free-form dict field used to pass validation and hang the run.
        ("nested-bomb", SMOKE.replace("teacher:\n", "teacher:\n  vllm_engine_args:\n" + _bomb("    "), 1),
         "values once YAML aliases are expanded"),
        ("top-bomb", _bomb() + SMOKE, "values once YAML aliases are expanded"),
        ("many-aliases", "x: &x 1\nys: [" + ", ".join(["*x"] * 2000) + "]\n" + SMOKE, "more than 1000 YAML aliases"),
        ("self-alias", SMOKE + "loop: &l [*l]\n", "refers to a node that contains it"),
        ("duplicate-top", SMOKE + "rounds: 30\n", "duplicate key 'rounds' at line"),
        ("duplicate-nested", SMOKE.replace("sampling:\n", "sampling:\n  n: 2\n  n: 3\n", 1), "duplicate key 'n'"),
        ("deep", "x: " + "[" * 100_000 + "]" * 100_000 + "\n", "nested too deeply"),
    ],
)
def test_hostile_yaml_is_refused_naming_the_file(tmp_path, name, text, reason):
    f = tmp_path / f"{name}.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(f)
    assert str(f) in str(err.value) and reason in str(err.value), str(err.value)


def test_oversized_and_non_utf8_configs_are_refused_naming_the_file(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text(SMOKE + "# " + "x" * 2_000_000 + "\n")
    with pytest.raises(ConfigError, match=f"{big} is larger than 1,000,000 bytes"):
        load_config(big)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(SMOKE.encode() + "run_name: Pr\xe4zision\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=f"{latin} is not UTF-8 text"):
        load_config(latin)


def test_merge_keys_and_shared_sections_still_load(tmp_path):
    """Aliases and `<<` merges (overriding a merged key is not a duplicate) keep working."""
    f = tmp_path / "c.yaml"
    f.write_text(
        "problems: [{kind: arithmetic}]\n"
        "teacher: &m {name_or_path: tiny-tutor, dtype: float32}\n"
        "student: {model: {<<: *m, dtype: auto}}\n"
    )
    cfg = load_config(f)
    assert (cfg.teacher.name_or_path, cfg.teacher.dtype) == ("tiny-tutor", "float32")
    assert (cfg.student.model.name_or_path, cfg.student.model.dtype) == ("tiny-tutor", "auto")
