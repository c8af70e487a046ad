"""The sandbox worker: a long-lived process that runs one untrusted program per request.

It is started by `pool.py` as `python -I -S worker.py` (inside bubblewrap when the machine has it)
and must therefore use the standard library only: it is never imported from the project inside the
sandbox, and the project's packages are not importable there. For each request it forks a fresh
child that drops into its own session, a fresh empty folder and closed descriptors, sets the
resource limits, installs the seccomp filter (where libseccomp is present) and only then compiles
and runs the program. The worker watches the child: output cap, wall clock (kills the child's
process group), exit status or signal; it answers with one JSON line per program.

Protocol (stdin/stdout of the worker, one JSON object per line):
  -> {"code": str, "limits": {...}}        <- {"exit": int|None, "signal": int|None, ...}
The first line the worker writes is a hello: {"ready": true, "seccomp": bool, "pid": int}.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import select
import shutil
import signal
import sys
import tempfile
import time

# --- seccomp (libseccomp through ctypes: no binding package, the C library every Debian has) ---

_ALLOW = 0x7FFF0000
_ERRNO_EPERM = 0x00050000 | 1
_ERRNO_ENOSYS = 0x00050000 | 38
_CMP_MASKED_EQ = 7
_CLONE_THREAD = 0x00010000

# What a math program never needs. Denied with EPERM (the program sees an OSError it can report),
# not killed, so a program that probes gets a readable traceback. Process creation and exec are
# denied outright: a fork bomb or a shell cannot start; signals to any process are denied, so the
# program cannot kill its worker (the worker, not the program, enforces the wall clock).
DENIED_SYSCALLS = (
    # network
    "socket", "socketpair", "connect", "bind", "listen", "accept", "accept4",
    "sendto", "sendmsg", "sendmmsg", "recvfrom", "recvmsg", "recvmmsg",
    # other processes
    "fork", "vfork", "execve", "execveat", "ptrace", "process_vm_readv", "process_vm_writev",
    "kill", "tkill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo",
    "pidfd_open", "pidfd_send_signal", "pidfd_getfd", "setsid", "setpgid",
    # the system
    "mount", "umount2", "pivot_root", "chroot", "unshare", "setns", "open_tree", "move_mount",
    "fsopen", "fsmount", "fsconfig", "fspick", "mount_setattr",
    "reboot", "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
    "swapon", "swapoff", "acct", "settimeofday", "clock_settime", "adjtimex", "sethostname",
    "setdomainname", "bpf", "perf_event_open", "userfaultfd", "io_uring_setup", "keyctl",
    "add_key", "request_key", "personality", "quotactl", "name_to_handle_at", "open_by_handle_at",
    "setuid", "setgid", "setreuid", "setregid", "setresuid", "setresgid", "setgroups",
    "ioperm", "iopl", "syslog", "vhangup", "lookup_dcookie", "memfd_create",
)


class _ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64)]


def load_libseccomp(path: str) -> ctypes.CDLL | None:
    """The libseccomp C library at `path`, or None when it cannot be loaded."""
    try:
        lib = ctypes.CDLL(path)
    except OSError:
        return None
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                           ctypes.c_uint, ctypes.POINTER(_ArgCmp)]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    return lib


def install_seccomp(lib: ctypes.CDLL) -> None:
    """Install the deny-list filter in this process (irreversible; no_new_privs is set too)."""
    ctx = lib.seccomp_init(_ALLOW)
    if not ctx:
        raise OSError("seccomp_init failed")
    try:
        for name in DENIED_SYSCALLS:
            nr = lib.seccomp_syscall_resolve_name(name.encode())
            if nr < 0:  # not a syscall on this architecture
                continue
            _add(lib, ctx, _ERRNO_EPERM, nr)
        # clone3 -> ENOSYS makes glibc fall back to clone, whose flags a filter can inspect:
        # threads (CLONE_THREAD) are allowed, new processes are not.
        nr = lib.seccomp_syscall_resolve_name(b"clone3")
        if nr >= 0:
            _add(lib, ctx, _ERRNO_ENOSYS, nr)
        nr = lib.seccomp_syscall_resolve_name(b"clone")
        cmp = _ArgCmp(0, _CMP_MASKED_EQ, _CLONE_THREAD, 0)
        rc = lib.seccomp_rule_add_array(ctx, _ERRNO_EPERM, nr, 1, ctypes.byref(cmp))
        if rc < 0:
            raise OSError(-rc, "seccomp_rule_add(clone)")
        rc = lib.seccomp_load(ctx)
        if rc < 0:
            raise OSError(-rc, "seccomp_load")
    finally:
        lib.seccomp_release(ctx)


def _add(lib: ctypes.CDLL, ctx: int, action: int, nr: int) -> None:
    rc = lib.seccomp_rule_add_array(ctx, action, nr, 0, None)
    if rc < 0:
        raise OSError(-rc, f"seccomp_rule_add({nr})")


# --- one program --------------------------------------------------------------------------------

_STDERR_TAIL = 2000


def _child(code: str, workdir: str, out_w: int, err_w: int, limits: dict, seccomp_lib) -> None:
    """In the forked child: confine, then run the program. Never returns."""
    try:
        os.setsid()  # its own process group: the worker kills the group, not just the child
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(out_w, 1)
        os.dup2(err_w, 2)
        os.closerange(3, 65536)  # the worker's protocol pipes and anything else inherited
        os.chdir(workdir)
        os.umask(0o077)
        for sig in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)
        mb = 1024 * 1024
        for res, value in ((resource.RLIMIT_CPU, limits["cpu_seconds"]),
                           (resource.RLIMIT_AS, limits["memory_mb"] * mb),
                           (resource.RLIMIT_FSIZE, limits["file_size_mb"] * mb),
                           (resource.RLIMIT_NOFILE, limits["open_files"]),
                           (resource.RLIMIT_NPROC, limits["processes"]),
                           (resource.RLIMIT_CORE, 0)):
            # CPU: SIGXCPU at the soft limit (reported as "cpu"), SIGKILL a second later.
            resource.setrlimit(res, (value, value + (res == resource.RLIMIT_CPU)))
        if seccomp_lib is not None:
            install_seccomp(seccomp_lib)
        import io
        sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False))
        sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding="utf-8")
        sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding="utf-8",
                                      errors="backslashreplace")
    except BaseException as exc:  # confinement failed: never run the program unconfined
        os.write(2, f"sandbox setup failed: {exc!r}\n".encode())
        os._exit(120)
    status = 0
    try:
        exec(compile(code, "<program>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if exc.code is not None and not isinstance(exc.code, int):
            print(exc.code, file=sys.stderr)
    except BaseException as exc:
        import traceback
        # From the program's first frame on: the worker's own frame would only confuse a reader.
        traceback.print_exception(type(exc), exc, exc.__traceback__.tb_next)
        status = 1
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        pass
    os._exit(status & 0xFF)


def run_program(code: str, limits: dict, seccomp_lib, tmp_root: str) -> dict:
    """Fork a confined child for `code`, watch it, and describe how it ended."""
    workdir = tempfile.mkdtemp(prefix="prog-", dir=tmp_root)
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        os.close(out_r)
        os.close(err_r)
        _child(code, workdir, out_w, err_w, limits, seccomp_lib)
    os.close(out_w)
    os.close(err_w)
    deadline = start + limits["wall_seconds"]
    out, err = bytearray(), bytearray()
    limit_hit = None
    open_fds = {out_r, err_r}
    pidfd = os.pidfd_open(pid)
    exited = False
    try:
        while open_fds or not exited:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                limit_hit = "wall"
                break
            # Once the child has exited, only drain what is already written: a descendant
            # that kept the pipes open must not hold the worker until the wall clock.
            wait = remaining if not exited else min(remaining, 0.05)
            ready, _, _ = select.select(list(open_fds) + ([] if exited else [pidfd]), [], [],
                                        wait)
            for fd in ready:
                if fd == pidfd:
                    exited = True
                    continue
                chunk = os.read(fd, 65536)
                if not chunk:
                    open_fds.discard(fd)
                elif fd == out_r:
                    out += chunk
                else:
                    err = (err + chunk)[-_STDERR_TAIL:]
            if len(out) > limits["output_bytes"]:
                limit_hit = "output"
                break
            # The child is gone but something it left holds the pipes open: stop reading.
            if exited and open_fds and not ready:
                break
    finally:
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        _, wstatus = os.waitpid(pid, 0)
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        for fd in (out_r, err_r, pidfd):
            os.close(fd)
        shutil.rmtree(workdir, ignore_errors=True)
    exit_code = os.WEXITSTATUS(wstatus) if os.WIFEXITED(wstatus) else None
    sig = os.WTERMSIG(wstatus) if os.WIFSIGNALED(wstatus) else None
    tail = err.decode("utf-8", "replace")
    if limit_hit is None:
        limit_hit = _limit_from(sig, tail, exit_code)
    return {
        "exit": exit_code,
        "signal": sig,
        "limit": limit_hit,
        "stdout": bytes(out[: limits["output_bytes"]]).decode("utf-8", "replace"),
        "stderr_tail": tail[-_STDERR_TAIL:],
        "seconds": round(time.monotonic() - start, 4),
        "cpu_seconds_total": round(ru.ru_utime + ru.ru_stime, 3),
    }


def _limit_from(sig: int | None, stderr_tail: str, exit_code: int | None) -> str | None:
    """Which resource limit ended the program, read from how it ended."""
    if sig == signal.SIGXCPU:
        return "cpu"
    if sig == signal.SIGXFSZ:
        return "file_size"
    if exit_code and "MemoryError" in stderr_tail:
        return "memory"
    if exit_code and "Too many open files" in stderr_tail:
        return "open_files"
    if exit_code == 120:
        return "setup"
    return None


def _stray_processes() -> list[int]:
    """Processes in this PID namespace other than its init and this worker (level 2 and up)."""
    me = os.getpid()
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) not in (1, me)]


def main() -> None:
    config = json.loads(sys.argv[1])
    seccomp_lib = load_libseccomp(config["libseccomp"]) if config.get("libseccomp") else None
    in_pid_namespace = config.get("pid_namespace", False)
    tmp_root = tempfile.mkdtemp(prefix="stillhouse-sandbox-", dir=config.get("tmp"))
    os.environ.clear()  # nothing from any parent reaches a program
    proto_in = os.fdopen(os.dup(0), "r", encoding="utf-8")
    proto_out = os.fdopen(os.dup(1), "w", encoding="utf-8")
    proto_out.write(json.dumps({"ready": True, "seccomp": seccomp_lib is not None,
                                "pid": os.getpid()}) + "\n")
    proto_out.flush()
    try:
        for line in proto_in:
            request = json.loads(line)
            result = run_program(request["code"], request["limits"], seccomp_lib, tmp_root)
            if in_pid_namespace:
                # Without seccomp a program can leave processes behind (new sessions, daemons):
                # in our own PID namespace every other process is the program's, so kill them.
                strays = _stray_processes()
                for p in strays:
                    try:
                        os.kill(p, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                result["strays_killed"] = len(strays)
            proto_out.write(json.dumps(result) + "\n")
            proto_out.flush()
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)


if __name__ == "__main__":
    main()
