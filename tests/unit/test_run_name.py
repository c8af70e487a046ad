"""Run names in any script (issue 16: "Präzision" blocked every run at its first artifact)."""

import pytest

from stillhouse.tasks.config import ConfigError, parse_config

pytestmark = pytest.mark.unit

MINIMAL = {
    "problems": [{"kind": "arithmetic"}],
    "teacher": {"name_or_path": "t"},
    "student": {"model": {"name_or_path": "s"}},
}
NAMES = ["Präzision", "Straße Ölung", "精度", "ÆØÅ run", "smoke", "My_Run v2.1", "x" * 100, "🚀 launch"]


@pytest.mark.parametrize("name", NAMES)
def test_artifact_keys_pass_prefects_own_validation(name):
    from prefect.client.schemas.actions import ArtifactCreate
    from prefect.types.names import raise_on_name_alphanumeric_dashes_only

    from stillhouse.flows.monitoring import artifact_key

    assert parse_config({**MINIMAL, "run_name": name}).run_name == name
    for suffix in ("-round-0", "-round-12", "-report"):
        key = artifact_key(name + suffix)
        assert raise_on_name_alphanumeric_dashes_only(key, "key") == key
        assert ArtifactCreate(key=key, type="table", data=[]).key == key


def test_artifact_keys_of_different_names_differ_and_ascii_keys_are_unchanged():
    from stillhouse.flows.monitoring import artifact_key

    keys = {artifact_key(n + "-report") for n in [*NAMES, "Prazision", "精确", "strasse olung"]}
    assert len(keys) == len(NAMES) + 3
    assert artifact_key("Präzision-round-1").startswith("prazision-round-1-")
    assert artifact_key("smoke-round-1") == "smoke-round-1"  # keys of existing runs stay as they were
    assert artifact_key("My_Run v2.1-report") == "my-run-v2-1-report"


@pytest.mark.parametrize("name", ["a/b", "50%", "x&y", "<run>", "tab\there", "  "])
def test_run_names_prefect_refuses_are_refused_at_load(name):
    with pytest.raises(ConfigError, match="run_name"):
        parse_config({**MINIMAL, "run_name": name})


def test_artifact_key_docstring_examples_run():
    import doctest

    import stillhouse.flows.monitoring as monitoring

    result = doctest.testmod(monitoring)
    assert result.attempted and not result.failed
