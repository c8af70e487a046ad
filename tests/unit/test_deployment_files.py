"""deployment/: prefect.yaml, the Kubernetes base job template and the images, checked statically.

No Docker engine or Kubernetes cluster here: these tests check what can be checked without them.
The deployments resolve to the real entry flow and their parameters to a valid RunConfig; the
Kubernetes template renders (with Prefect's own templating) into a Job that requests GPUs and
mounts the run directory volume; the images pin the versions the project is tested with and
start the `stillhouse` console script. tests/server/test_deployment.py deploys the file for real.
"""

from __future__ import annotations

import inspect
import json
import re
import tomllib
from pathlib import Path, PurePosixPath

import pytest
import yaml

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deployment"


def _prefect_yaml() -> dict:
    return yaml.safe_load((DEPLOY / "prefect.yaml").read_text())


SHARD_ENTRY = "stillhouse.flows.shards:run_shard"
TRAIN_ENTRY = "stillhouse.flows.shards:run_train"


def _deployments() -> dict[str, dict]:
    """The scheduled deployments (the shard and train deployments are started by a round, see below)."""
    return {d["name"]: d for d in _prefect_yaml()["deployments"] if d["entrypoint"] not in (SHARD_ENTRY, TRAIN_ENTRY)}


def _shard_deployments() -> dict[str, dict]:
    return {d["name"]: d for d in _prefect_yaml()["deployments"] if d["entrypoint"] == SHARD_ENTRY}


def _train_deployments() -> dict[str, dict]:
    return {d["name"]: d for d in _prefect_yaml()["deployments"] if d["entrypoint"] == TRAIN_ENTRY}


def _template() -> dict:
    return json.loads((DEPLOY / "k8s-base-job-template.json").read_text())


def test_files_exist():
    for name in ("prefect.yaml", "k8s-base-job-template.json", "Dockerfile", "Dockerfile.vllm"):
        assert (DEPLOY / name).is_file(), name
    assert (REPO / "docs" / "deployment.md").is_file()


# --------------------------------------------------------------------------- prefect.yaml


def test_every_deployment_starts_the_scheduled_entry_flow():
    from prefect.flows import Flow, load_flow_from_entrypoint

    from stillhouse.flows.scheduled import scheduled_distill

    deployments = _deployments()
    assert {"gsm8k-nightly", "gsm8k-weekly-k8s"} <= set(deployments)
    for name, d in deployments.items():
        flow = load_flow_from_entrypoint(d["entrypoint"], use_placeholder_flow=False)
        assert isinstance(flow, Flow), name
        assert flow.fn is scheduled_distill.fn, name


@pytest.mark.parametrize("name", ["gsm8k-nightly", "gsm8k-weekly-k8s"])
def test_parameters_bind_to_the_flow_and_give_a_valid_run_config(name):
    from stillhouse.flows.scheduled import resolve_config, scheduled_distill

    params = _deployments()[name]["parameters"]
    inspect.signature(scheduled_distill.fn).bind(**params)  # no unknown or missing parameter
    validated = scheduled_distill.validate_parameters(params)  # what Prefect does at run time
    # Relative config paths are relative to the flow run's working directory: the repository
    # root (process pool) or /opt/stillhouse in the image, which holds the same configs/.
    config = validated["config"]
    if isinstance(config, str) and not Path(config).is_absolute():
        config = str(REPO / config)
    cfg = resolve_config(config, validated.get("overrides"))
    assert cfg.rounds >= 1
    assert validated["mode"] in ("continue", "dated")


def test_parameters_match_the_flows_published_schema():
    """Prefect enforces the parameter schema on deployment runs; the file's values must pass it."""
    import jsonschema
    from prefect.utilities.callables import parameter_schema

    from stillhouse.flows.scheduled import scheduled_distill

    schema = parameter_schema(scheduled_distill).model_dump_for_openapi()
    for name, d in _deployments().items():
        jsonschema.validate(d["parameters"], schema)


def test_schedules_and_concurrency():
    from prefect.client.schemas.objects import ConcurrencyLimitStrategy
    from prefect.client.schemas.schedules import CronSchedule

    for name, d in _deployments().items():
        assert d["schedules"], name
        for s in d["schedules"]:
            CronSchedule(cron=s["cron"], timezone=s.get("timezone"))  # raises on a bad cron
        limit = d["concurrency_limit"]
        # One tick of a deployment at a time; what happens to the next one is a choice.
        assert limit["limit"] == 1, name
        ConcurrencyLimitStrategy(limit["collision_strategy"])
    strategies = {d["concurrency_limit"]["collision_strategy"] for d in _deployments().values()}
    assert strategies == {"ENQUEUE", "CANCEL_NEW"}


def test_modes_continue_on_the_gpu_box_and_dated_on_kubernetes():
    d = _deployments()
    assert d["gsm8k-nightly"]["parameters"]["mode"] == "continue"
    assert d["gsm8k-weekly-k8s"]["parameters"]["mode"] == "dated"


def test_deploy_time_build_step_sets_the_gpu_limit():
    from stillhouse.flows.cli import build_parser

    steps = _prefect_yaml()["build"]
    scripts = [s["prefect.deployments.steps.run_shell_script"]["script"] for s in steps
               if "prefect.deployments.steps.run_shell_script" in s]
    assert scripts == ["stillhouse gpu-limit"]
    args = build_parser().parse_args(scripts[0].split()[1:])
    assert args.command == "gpu-limit" and args.tag == "gpu"


# --------------------------------------------------------------------------- Kubernetes


def _rendered_job(job_variables: dict) -> dict:
    """The job configuration a Kubernetes worker would build: template defaults, then the
    deployment's job variables, through Prefect's templating."""
    from prefect.utilities.templating import apply_values

    template = _template()
    values = {k: p["default"] for k, p in template["variables"]["properties"].items() if "default" in p}
    values.update(job_variables)
    values["command"] = "prefect flow-run execute"
    return apply_values(template["job_configuration"], values)


def test_k8s_template_placeholders_are_all_declared_variables():
    from prefect.utilities.templating import find_placeholders

    template = _template()
    used = {p.name for p in find_placeholders(template["job_configuration"])}
    assert used <= set(template["variables"]["properties"]), used - set(template["variables"]["properties"])


@pytest.mark.parametrize("name", ["gsm8k-weekly-k8s", "gpu-shard-k8s", "gpu-train-k8s"])
def test_k8s_deployment_job_variables_fit_the_template_schema(name):
    import jsonschema

    template = _template()
    d = {**_deployments(), **_shard_deployments(), **_train_deployments()}[name]
    job_variables = d["work_pool"]["job_variables"]
    schema = {**template["variables"], "required": []}
    jsonschema.validate(job_variables, schema)
    assert set(job_variables) <= set(template["variables"]["properties"])


def test_shard_deployments_run_the_shard_flow_the_config_names_by_default():
    """The default execution.shard_deployment is in the file, unscheduled (a round starts its
    shards), and its parameters are the shard flow's."""
    from prefect.flows import load_flow_from_entrypoint

    from stillhouse.flows.shards import run_shard
    from stillhouse.tasks.config import ExecutionConfig

    shards = _shard_deployments()
    assert {"gpu-shard", "gpu-shard-k8s"} <= set(shards)
    flow_name, deployment = ExecutionConfig().shard_deployment.split("/")
    assert flow_name == run_shard.name and deployment in shards
    for name, d in shards.items():
        assert load_flow_from_entrypoint(d["entrypoint"], use_placeholder_flow=False).fn is run_shard.fn, name
        assert not d.get("schedules"), name
    assert shards["gpu-shard"]["work_pool"]["name"] == _deployments()["gsm8k-nightly"]["work_pool"]["name"]
    assert shards["gpu-shard-k8s"]["work_pool"]["name"] == _deployments()["gsm8k-weekly-k8s"]["work_pool"]["name"]


def test_k8s_job_requests_gpus_mounts_the_run_volume_and_sets_the_image():
    d = _deployments()["gsm8k-weekly-k8s"]
    job = _rendered_job(d["work_pool"]["job_variables"])
    pod = job["job_manifest"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == d["work_pool"]["job_variables"]["image"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == d["work_pool"]["job_variables"]["gpus"] >= 1
    assert container["resources"]["requests"]["nvidia.com/gpu"] == container["resources"]["limits"]["nvidia.com/gpu"]

    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    run_volume = next(name for name, path in mounts.items() if path == d["work_pool"]["job_variables"]["workdir_mount_path"])
    assert claims[run_volume] == d["work_pool"]["job_variables"]["workdir_pvc"]
    # The deployment's run directories live on that volume, not in the pod's own filesystem.
    workdir = PurePosixPath(d["parameters"]["overrides"]["workdir"])
    assert PurePosixPath(mounts[run_volume]) in workdir.parents

    # The image's entrypoint is `stillhouse`; the worker's flow-run command comes as args, so the
    # container command must replace the entrypoint for those args to run as they are.
    assert container["command"] == ["/usr/bin/env"]
    assert container["args"] == "prefect flow-run execute"
    assert container["workingDir"] == d["pull"][0]["prefect.deployments.steps.set_working_directory"]["directory"]


# --------------------------------------------------------------------------- images


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(
        line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")
    ))
    out = []
    for line in text.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _from_image(path: Path) -> str:
    ins = _instructions(path)
    args = {}
    for word, rest in ins:
        if word == "ARG" and "=" in rest:
            k, v = rest.split("=", 1)
            args[k] = v
        if word == "FROM":
            return re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], rest.split()[0])
    raise AssertionError(f"{path} has no FROM")


def test_pipeline_image_is_cuda_based():
    # What it installs, and that it matches what the tests run, is checked in test_locks.py.
    assert _from_image(DEPLOY / "Dockerfile").startswith("nvidia/cuda:")


def test_vllm_image_is_built_on_the_pipeline_image():
    base = _from_image(DEPLOY / "Dockerfile.vllm")
    assert base.split(":")[0] == "stillhouse"
    assert f"-t {base} " in (DEPLOY / "Dockerfile").read_text() + " "


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.vllm"])
def test_image_entrypoint_is_the_stillhouse_console_script(name):
    entry = [json.loads(rest) for word, rest in _instructions(DEPLOY / name) if word == "ENTRYPOINT"]
    assert entry[-1] == ["stillhouse"]
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    module, func = scripts["stillhouse"].split(":")
    assert callable(getattr(__import__(module, fromlist=[func]), func))


def test_docs_give_the_build_commands_and_say_the_images_were_not_built():
    doc = " ".join((REPO / "docs" / "deployment.md").read_text().split())
    assert "docker build -f deployment/Dockerfile " in doc
    assert "docker build -f deployment/Dockerfile.vllm " in doc
    assert "not been built" in doc


# --------------------------------------------------------------------------- the entry flow's decisions


class _Ticks:
    """Runs `scheduled_distill`'s body without Prefect: the multi-round flow is replaced by a fake
    that records the config it got and completes its rounds as the real flow would (catalog
    commit, then the round summary)."""

    def __init__(self, monkeypatch):
        import logging

        import stillhouse.flows.scheduled as scheduled

        self.calls: list = []
        self.log = logging.getLogger("test-ticks")

        def fake_distill(cfg):
            from stillhouse.storage.catalog import Catalog
            from stillhouse.tasks.report import record_round

            self.calls.append(cfg)
            with Catalog(cfg.workdir) as cat:
                done = {r.round for r in cat.status().rounds if r.status == "committed"}
                for r in range(cfg.rounds):
                    if r not in done:
                        cat.add_problems([{"problem_id": f"p{r}", "question": "q", "answer": "1", "source": "t",
                                           "split": "train", "parent_id": None, "operation": "seed",
                                           "round_introduced": r, "meta": {}}])
                        cat.commit_round(r, {}, config_hash="h")
                    record_round(cfg.workdir, r, {"round": r})
            return [{"round": r} for r in range(cfg.rounds)]

        class FakeFlow:
            def with_options(self, **_):
                return fake_distill

        monkeypatch.setattr(scheduled, "distill", FakeFlow())
        monkeypatch.setattr(scheduled, "get_run_logger", lambda: self.log)
        self.fn = scheduled.scheduled_distill.fn


@pytest.fixture
def ticks(monkeypatch):
    return _Ticks(monkeypatch)


def _smoke(tmp_path) -> dict:
    data = yaml.safe_load((REPO / "configs" / "smoke.yaml").read_text())
    return {**data, "workdir": str(tmp_path / "run"), "rounds": 3}


def test_continue_adds_rounds_per_tick_then_reports_finished(ticks, tmp_path, caplog):
    caplog.set_level("INFO", logger=ticks.log.name)
    config = _smoke(tmp_path)
    outs = [ticks.fn(config, mode="continue", rounds_per_run=2) for _ in range(3)]
    assert [o["action"] for o in outs] == ["ran", "ran", "finished"]
    assert [c.rounds for c in ticks.calls] == [2, 3]  # 2 rounds, then the last one; never past 3
    assert [o["completed_after"] for o in outs] == [2, 3, 3]
    assert "has already finished" in caplog.text


def test_a_committed_round_without_its_summary_is_not_complete(ticks, tmp_path):
    from stillhouse.flows.scheduled import completed_rounds

    config = _smoke(tmp_path)
    ticks.fn(config, rounds_per_run=2)
    assert completed_rounds(config["workdir"]) == 2
    (Path(config["workdir"]) / "rounds" / "round-1.json").unlink()  # cut off after its commit
    assert completed_rounds(config["workdir"]) == 1
    out = ticks.fn(config, rounds_per_run=1)
    assert out["completed_before"] == 1 and ticks.calls[-1].rounds == 2


def test_dated_mode_runs_in_a_workdir_and_name_of_the_tick_date(ticks, tmp_path, monkeypatch):
    from datetime import UTC, datetime

    import stillhouse.flows.scheduled as scheduled

    monkeypatch.setattr(scheduled, "_tick_time", lambda: datetime(2026, 3, 7, 23, 30, tzinfo=UTC))
    config = _smoke(tmp_path)
    out = ticks.fn(config, overrides={"run_name": "nightly"}, mode="dated")
    assert out["action"] == "ran"
    assert ticks.calls[0].workdir == f"{tmp_path / 'run'}-2026-03-07"
    assert ticks.calls[0].run_name == "nightly-2026-03-07"
    # The same date again continues (and here finds finished) that day's run.
    assert ticks.fn(config, overrides={"run_name": "nightly"}, mode="dated")["action"] == "finished"
    assert not (tmp_path / "run").exists()


def test_a_workdir_held_by_another_process_skips_the_tick(ticks, tmp_path):
    from stillhouse.storage.lock import RunLock

    config = _smoke(tmp_path)
    with RunLock(config["workdir"]):
        out = ticks.fn(config)
    assert out["action"] == "skipped" and "in use by pid" in out["reason"]
    assert ticks.calls == []


def test_config_path_overrides_and_bad_values(tmp_path):
    from stillhouse.flows.scheduled import dated_config, resolve_config
    from stillhouse.tasks.config import ConfigError

    cfg = resolve_config(str(REPO / "configs" / "smoke.yaml"), {"rounds": 5, "workdir": None})
    assert cfg.rounds == 5 and cfg.workdir == "runs/smoke"  # None = keep the config's value
    assert resolve_config(cfg, {"rounds": 1}).rounds == 1
    with pytest.raises(ConfigError, match="rounds"):
        resolve_config(cfg, {"rounds": 0})
    from datetime import UTC, datetime

    with pytest.raises(ConfigError, match="folder name"):
        dated_config(cfg, datetime(2026, 1, 1, tzinfo=UTC), "%Y/%m/%d")


def test_train_deployments_run_the_train_flow_the_config_names_by_default():
    """The default execution.train_deployment is in the file, unscheduled, on the shards' pools."""
    from prefect.flows import load_flow_from_entrypoint

    from stillhouse.flows.shards import run_train
    from stillhouse.tasks.config import ExecutionConfig

    train, shards = _train_deployments(), _shard_deployments()
    assert {"gpu-train", "gpu-train-k8s"} <= set(train)
    flow_name, deployment = ExecutionConfig().train_deployment.split("/")
    assert flow_name == run_train.name and deployment in train
    for name, d in train.items():
        assert load_flow_from_entrypoint(d["entrypoint"], use_placeholder_flow=False).fn is run_train.fn, name
        assert not d.get("schedules"), name
    assert train["gpu-train"]["work_pool"] == shards["gpu-shard"]["work_pool"]
    assert train["gpu-train-k8s"]["work_pool"] == shards["gpu-shard-k8s"]["work_pool"]
