"""An experiment: one base run config, arms that override it, seeds, and a control arm.

`stillhouse experiment CONFIG` runs every arm x seed as an ordinary run (its own workdir under the
experiment's, so each is resumable and inspectable with `stillhouse status`), all sharing one
content-addressed cache: arms that differ only after sampling (weighting, training, ...) pay for
the teacher once per seed. This module turns the experiment file into those run configs; it knows
nothing of Prefect.

A seed sets both the teacher's sampling seed and the student's training seed: a seed is one
independent replication of the whole pipeline, and within a seed every arm sees the same teacher
samples (a paired comparison).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from stillhouse.tasks.config import ConfigError, RunConfig, parse_config

# Set by the experiment for every arm: an arm overriding them would break the layout or the pairing.
RESERVED = ("run_name", "workdir", "cache_dir", "sampling.seed", "training.seed")
BASE_ARM = "base"  # the untrained student, read from the runs' own base rows


class ArmConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    description: str = Field("", description="What this arm tests, shown in the report.")
    overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="Changes to the base config for this arm: nested mappings or dotted keys, "
        "e.g. {weighting.scheme: uniform} or {weighting: {scheme: uniform}}.",
    )


class ExperimentConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(..., description="Experiment name: flow-run names, artifact key, report title.")
    workdir: str = Field(
        "runs/experiment",
        description="Experiment folder: arms/<arm>/seed-<s>/ (one run each), cache/ (shared by "
        "all runs), experiment.json and the report.",
    )
    base: str = Field(
        ..., description="The run config every arm starts from; a path relative to this file."
    )
    overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="Changes to the base config for every arm (applied before the arm's own), "
        "e.g. a larger eval set or fewer rounds.",
    )
    cache_dir: str | None = Field(
        None,
        description="The cache every run of the experiment shares; None = <workdir>/cache. "
        "Point two experiments with the same teacher, problems and sampling at one folder and the "
        "second finds the first's teacher samples (run them one after the other, not at once).",
    )
    seeds: list[int] = Field(
        [0], min_length=1, description="Replications: each seed reruns every arm with its own "
        "teacher samples and training seed."
    )
    arms: dict[str, ArmConfig] = Field(..., min_length=1, description="Arm name -> its overrides.")
    control: str = Field(
        ..., description="The arm every other arm (and the untrained base) is compared with."
    )
    optimizer_steps: int | None = Field(
        None,
        ge=1,
        description="Training budget per round, equal across arms: sets training.max_steps for "
        "every arm that does not set it itself. Without it, arms whose datasets differ in size "
        "(group_advantage drops zero-weight groups, rft drops wrong samples) train for "
        "different numbers of steps.",
    )
    include_base: bool = Field(
        True, description="Report the untrained student as an arm named 'base' (no extra work: "
        "every run evaluates it once and all runs of a seed share that evaluation)."
    )
    bootstrap_samples: int = Field(
        10000, ge=100, description="Bootstrap resamples for every interval."
    )

    @field_validator("arms")
    @classmethod
    def _arm_names(cls, arms: dict[str, ArmConfig]) -> dict[str, ArmConfig]:
        for name in arms:
            if name == BASE_ARM:
                raise ValueError(f"arm name {BASE_ARM!r} is reserved for the untrained student")
            if not name or not all(c.isalnum() or c in "-_" for c in name):
                raise ValueError(f"arm name {name!r}: use letters, digits, '-' and '_' (it names a folder)")
        return arms

    @model_validator(mode="after")
    def _check(self) -> ExperimentConfig:
        if self.control not in self.arms and not (self.include_base and self.control == BASE_ARM):
            raise ValueError(f"control {self.control!r} is not one of the arms {sorted(self.arms)}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds repeat: {self.seeds}")
        for where, overrides in [("overrides", self.overrides)] + [
            (f"arms.{a}.overrides", arm.overrides) for a, arm in self.arms.items()
        ]:
            for key in _flatten(expand_dotted(overrides)):
                if key in RESERVED:
                    raise ValueError(f"{where}: {key} is set by the experiment for every run")
        return self


def expand_dotted(overrides: dict[str, Any]) -> dict[str, Any]:
    """{'a.b': 1, 'c': {'d.e': 2}} -> {'a': {'b': 1}, 'c': {'d': {'e': 2}}}."""
    out: dict[str, Any] = {}
    for key, value in overrides.items():
        value = expand_dotted(value) if isinstance(value, dict) else value
        *parents, leaf = str(key).split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {key!r} goes inside {p!r}, which is not a mapping")
        if isinstance(node.get(leaf), dict) and isinstance(value, dict):
            node[leaf] = deep_merge(node[leaf], value)
        else:
            node[leaf] = value
    return out


def deep_merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """`changes` over `base`; mappings merge key by key, anything else (lists too) is replaced."""
    out = copy.deepcopy(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _flatten(d: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for k, v in d.items():
        path = f"{prefix}{k}"
        keys.extend(_flatten(v, path + ".") if isinstance(v, dict) and v else [path])
    return keys


def _read_yaml(path: Path) -> dict[str, Any]:
    """A mapping from a YAML file, through the bounded loader run configs use (size, aliases,
    duplicate keys, encoding; the file named in every error)."""
    from stillhouse.tasks.bounded_yaml import YamlFileError, load_yaml_file

    try:
        data = load_yaml_file(path)
    except YamlFileError as err:
        raise ConfigError(str(err)) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must be a mapping at the top level")
    return data


class Experiment:
    """A validated experiment file and the run config of each (arm, seed)."""

    def __init__(self, config: ExperimentConfig, base: dict[str, Any], origin: str):
        self.config = config
        self.origin = origin
        self._base = deep_merge(base, expand_dotted(config.overrides))
        # Every arm's config is built once here, so a bad override fails before any work.
        self.runs = {(arm, seed): self._run_config(arm, seed) for seed in config.seeds for arm in config.arms}

    @property
    def workdir(self) -> Path:
        return Path(self.config.workdir)

    @property
    def cache_dir(self) -> Path:
        return Path(self.config.cache_dir) if self.config.cache_dir else self.workdir / "cache"

    def run_dir(self, arm: str, seed: int) -> Path:
        return self.workdir / "arms" / arm / f"seed-{seed}"

    def _run_config(self, arm: str, seed: int) -> RunConfig:
        data = deep_merge(self._base, expand_dotted(self.config.arms[arm].overrides))
        fixed = {
            "run_name": f"{self.config.name}-{arm}-seed{seed}",
            "workdir": str(self.run_dir(arm, seed)),
            "cache_dir": str(self.cache_dir),
            "sampling": {"seed": seed},
            "training": {"seed": seed},
        }
        if self.config.optimizer_steps is not None and "max_steps" not in data.get("training", {}):
            fixed["training"]["max_steps"] = self.config.optimizer_steps
        return parse_config(deep_merge(data, fixed), origin=f"{self.origin} (arm {arm}, seed {seed})")

    def arm_order(self) -> list[str]:
        """Control first, then the other arms as written; 'base' leads when it is reported."""
        arms = [self.config.control] if self.config.control in self.config.arms else []
        arms += [a for a in self.config.arms if a not in arms]
        return ([BASE_ARM] if self.config.include_base else []) + arms


def load_experiment(path: str | Path, workdir: str | None = None) -> Experiment:
    """Read and validate an experiment file and its base config; errors name the file and field."""
    path = Path(path)
    data = _read_yaml(path)
    if workdir is not None:
        data["workdir"] = workdir
    try:
        config = ExperimentConfig.model_validate(data)
    except ValidationError as err:
        lines = [f"invalid experiment {path}:"]
        lines += [f"  {'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in err.errors()]
        raise ConfigError("\n".join(lines)) from None
    base_path = (path.parent / config.base).resolve()
    try:
        return Experiment(config, _read_yaml(base_path), origin=str(path))
    except ConfigError:
        raise
    except ValueError as err:
        raise ConfigError(f"experiment {path}: {err}") from None
