"""Which isolation layers this machine offers, and the command that starts a sandboxed worker.

Levels (each includes the ones below it):
  1  a separate interpreter (`python -I -S`: no site-packages, no user paths, no PYTHON* variables)
     with an empty environment, a fresh temporary folder per program, resource limits (CPU, address
     space, processes, file size, open files), a wall clock that kills the program's process group,
     and a cap on captured output;
  2  + bubblewrap: no network, own PID/IPC/UTS/user/cgroup namespaces, an unprivileged uid with no
     capabilities, a private tmpfs, read-only binds of only the interpreter, its standard library
     (site-packages hidden under an empty tmpfs) and the shared libraries it loads; dies with its
     parent;
  3  + a seccomp filter (libseccomp via ctypes) denying sockets, process creation, exec, signals,
     ptrace, mount, ... in every program.
seccomp is applied whenever libseccomp loads, even without bubblewrap (defence in depth), but
level 3 is only claimed on top of level 2.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

WORKER = Path(__file__).with_name("worker.py")
# Where the worker script appears inside the bubblewrap sandbox.
WORKER_IN_SANDBOX = "/sandbox/worker.py"
SANDBOX_UID = 65534  # "nobody"

INSTALL_HINT = {
    2: "bubblewrap (Debian/Ubuntu: `apt-get install bubblewrap`, or `make system-deps` as root); "
       "in a container, bubblewrap also needs user namespaces (docker: --security-opt "
       "seccomp=unconfined, or a runtime that allows unshare)",
    3: "libseccomp (Debian/Ubuntu: `apt-get install libseccomp2`) and a kernel with seccomp",
}


class SandboxUnavailable(OSError):
    """The machine offers less isolation than the configured minimum: PoT refuses to run.
    (An OSError: what is missing is part of the system, and the CLI reports it as one line.)"""


@dataclass(frozen=True)
class Isolation:
    """What this machine offers: the level, the tools found, and why higher levels are missing."""

    level: int
    python: str
    bwrap: str | None
    libseccomp: str | None
    missing: tuple[str, ...]

    def require(self, min_level: int) -> None:
        """Raise SandboxUnavailable naming what is missing when the level is below min_level."""
        if self.level >= min_level:
            return
        needed = [INSTALL_HINT[lvl] for lvl in range(self.level + 1, min_level + 1)]
        raise SandboxUnavailable(
            f"program-of-thought needs sandbox isolation level {min_level}, this machine offers "
            f"level {self.level} ({'; '.join(self.missing)}). Install: {'; '.join(needed)}. "
            "Or lower sandbox.min_level (not recommended: model-written code runs with less "
            "isolation). Nothing was run."
        )


def sandbox_python() -> str:
    """The real interpreter binary (a venv's python is a symlink to it; the venv is not bound)."""
    return os.path.realpath(sys.executable)


def find_library(name: str) -> str | None:
    """Absolute path of a shared library: `name` itself when it is a path, else via ldconfig."""
    if os.sep in name:
        return name if os.path.exists(name) else None
    for ldconfig in ("ldconfig", "/sbin/ldconfig", "/usr/sbin/ldconfig"):
        try:
            out = subprocess.run([ldconfig, "-p"], capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.TimeoutExpired):
            continue
        found = [line.split(" => ", 1) for line in out.splitlines() if " => " in line]
        found = [(desc, path.strip()) for desc, path in found if desc.split()[0] == name]
        # ldconfig lists every architecture's copy; prefer this interpreter's (64-bit here).
        found.sort(key=lambda entry: "x86-64" not in entry[0] and "64" not in entry[0])
        if found:
            return found[0][1]
    return None


@functools.lru_cache(maxsize=4)
def _shared_libraries(python: str) -> tuple[str, ...]:
    """The shared libraries the interpreter and its extension modules load (paths as ldd names them)."""
    dynload = Path(sysconfig.get_path("platstdlib", vars={"platbase": sys.base_prefix})) / "lib-dynload"
    files = [python, *map(str, sorted(dynload.glob("*.so")))]
    out = subprocess.run(["ldd", *files], capture_output=True, text=True, timeout=60).stdout
    libs = set()
    for line in out.splitlines():
        m = re.search(r"(?:=>\s*)?(/\S+)\s+\(0x", line)
        if m:
            libs.add(m.group(1))
    return tuple(sorted(libs))


def _stdlib() -> tuple[str, list[str]]:
    """The standard library folder and the site-packages folders inside it (to hide)."""
    base = {"base": sys.base_prefix, "platbase": sys.base_prefix,
            "installed_base": sys.base_prefix, "installed_platbase": sys.base_prefix}
    stdlib = os.path.realpath(sysconfig.get_path("stdlib", vars=base))
    hidden = [os.path.join(stdlib, d) for d in ("site-packages", "dist-packages")
              if os.path.isdir(os.path.join(stdlib, d))]
    return stdlib, hidden


def worker_command(python: str, bwrap: str | None, libseccomp: str | None) -> list[str]:
    """argv that starts one worker: bare isolated interpreter (level 1) or inside bubblewrap."""
    config = {"libseccomp": libseccomp, "pid_namespace": bwrap is not None,
              "tmp": "/tmp" if bwrap else None}
    if bwrap is None:
        return [python, "-I", "-S", str(WORKER), json.dumps(config)]
    stdlib, hidden = _stdlib()
    argv = [bwrap, "--unshare-all", "--unshare-user", "--uid", str(SANDBOX_UID),
            "--gid", str(SANDBOX_UID), "--cap-drop", "ALL", "--die-with-parent", "--new-session",
            "--hostname", "sandbox", "--clearenv", "--dev", "/dev", "--proc", "/proc",
            "--tmpfs", "/tmp", "--ro-bind", python, python, "--ro-bind", stdlib, stdlib]
    for folder in hidden:  # the stdlib without any installed package (the project's included)
        argv += ["--tmpfs", folder, "--remount-ro", folder]
    for lib in sorted({*_shared_libraries(python), *([libseccomp] if libseccomp else [])}):
        argv += ["--ro-bind", lib, lib]
    argv += ["--ro-bind", str(WORKER), WORKER_IN_SANDBOX, "--chdir", "/tmp", "--",
             python, "-I", "-S", WORKER_IN_SANDBOX, json.dumps(config)]
    return argv


_PROBE = """
import socket, os
try:
    socket.socket()
    print("socket-allowed")
except OSError:
    print("socket-denied")
"""


def _probe(python: str, bwrap: str | None, libseccomp: str | None) -> tuple[bool, str]:
    """Start a worker with these layers and run one program that tries to open a socket.

    Returns (worked, seccomp_effective); a worker that cannot start returns (False, reason).
    """
    argv = worker_command(python, bwrap, libseccomp)
    try:
        proc = subprocess.run(argv, input=json.dumps({"code": _PROBE, "limits": PROBE_LIMITS}) + "\n",
                              capture_output=True, text=True, timeout=30, env={})
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, str(exc)
    lines = proc.stdout.splitlines()
    if len(lines) < 2:
        return False, (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
    result = json.loads(lines[1])
    return True, "socket-denied" if "socket-denied" in result["stdout"] else result["stdout"]


PROBE_LIMITS = {"cpu_seconds": 5, "wall_seconds": 20, "memory_mb": 512, "file_size_mb": 1,
                "open_files": 64, "processes": 16, "output_bytes": 4096}


@functools.lru_cache(maxsize=8)
def detect(bwrap: str = "bwrap", libseccomp: str = "libseccomp.so.2") -> Isolation:
    """Probe the layers for real (start a worker, try a socket) and return the level reached."""
    python = sandbox_python()
    missing: list[str] = []
    bwrap_path = shutil.which(bwrap)
    lib_path = find_library(libseccomp)
    if lib_path is None:
        missing.append(f"libseccomp ({libseccomp}) not found")
    if bwrap_path is None:
        missing.append(f"bubblewrap ({bwrap}) not found")
    else:
        ok, why = _probe(python, bwrap_path, None)
        if not ok:
            missing.append(f"bubblewrap at {bwrap_path} cannot create a sandbox here: {why}")
            bwrap_path = None
    if lib_path is not None:
        ok, why = _probe(python, bwrap_path, lib_path)
        if not ok or why != "socket-denied":
            missing.append(f"the seccomp filter did not take effect ({why})")
            lib_path = None
    level = 1 + (bwrap_path is not None) + (bwrap_path is not None and lib_path is not None)
    return Isolation(level, python, bwrap_path, lib_path, tuple(missing))
