"""The PoT sandbox against hostile programs (issue 13), at the highest level this machine offers.

Every program runs in a real SandboxPool (real bubblewrap, real seccomp where present); after each
one the same pool must still run an honest program, so "contained" means both: the attack did
not get out, and the pipeline goes on.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from stillhouse.tasks.config import SandboxConfig
from stillhouse.tasks.sandbox.isolation import SandboxUnavailable, detect
from stillhouse.tasks.sandbox.pool import SandboxPool

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SECRET = "sk-stillhouse-test-0123456789"
LIMITS = dict(workers=2, cpu_seconds=1, wall_seconds=3.0, memory_mb=256, file_size_mb=1,
              output_bytes=4096)
LEVEL = detect().level


@pytest.fixture(scope="module")
def pool():
    if LEVEL < 2:
        pytest.skip(f"the hostile suite needs isolation level >= 2, this machine offers {LEVEL} "
                    f"({'; '.join(detect().missing)})")
    # A credential in the parent's environment: no program may see it.
    old = os.environ.get("STILLHOUSE_TEST_API_KEY")
    os.environ["STILLHOUSE_TEST_API_KEY"] = SECRET
    try:
        with SandboxPool(SandboxConfig(min_level=LEVEL, **LIMITS)) as p:
            yield p
    finally:
        if old is None:
            os.environ.pop("STILLHOUSE_TEST_API_KEY", None)
        else:
            os.environ["STILLHOUSE_TEST_API_KEY"] = old


def still_works(pool, level=LEVEL):
    r = pool.run("print(sum(range(10)))")
    assert (r.stdout, r.exit, r.level) == ("45\n", 0, level), r


def test_the_machine_offers_the_full_sandbox():
    # The images and `make test` install bubblewrap and libseccomp (deployment/apt-packages.txt):
    # a missing layer here is a setup fault to see, not to skip past.
    iso = detect()
    assert iso.level == 3, iso.missing


def test_honest_programs_run_and_print(pool):
    results = pool.run_many(["print(6 * 7)", "import math\nprint(math.factorial(5))",
                             "x = 1\nprint(x / 0)"])
    assert [r.stdout for r in results[:2]] == ["42\n", "120\n"]
    assert all(r.ok and r.failure is None for r in results[:2])
    assert results[2].exit == 1 and "ZeroDivisionError" in results[2].stderr_tail
    assert results[2].failure.startswith("exit 1: ZeroDivisionError")


@pytest.mark.parametrize("code, limits", [
    ("while True: pass", {"cpu", "wall"}),
    ("import os\nos.close(1)\nos.close(2)\nwhile True: pass", {"cpu", "wall"}),
    ("import time\ntime.sleep(60)", {"wall"}),
], ids=["infinite-loop", "busy-wait-after-closing-stdout", "sleep"])
def test_runaway_programs_are_stopped_by_a_limit(pool, code, limits):
    r = pool.run(code)
    assert r.limit in limits and not r.ok, r
    assert r.seconds < LIMITS["wall_seconds"] + 2
    still_works(pool)


def test_memory_bomb_hits_the_address_space_limit(pool):
    for code in ("x = bytearray(10**10)", "x = []\nwhile True: x.append(' ' * 10**6)"):
        r = pool.run(code)
        assert r.limit == "memory" and "MemoryError" in r.stderr_tail, r
    still_works(pool)


@pytest.mark.skipif(LEVEL < 3, reason="without seccomp a fork bomb is only bounded by the wall clock")
def test_fork_bomb_cannot_fork(pool):
    r = pool.run("import os\nwhile True:\n    os.fork()")
    assert r.exit == 1 and "PermissionError" in r.stderr_tail, r
    r = pool.run("import multiprocessing as mp\nps = [mp.Process(target=print) for _ in range(50)]\n"
                 "[p.start() for p in ps]")
    assert not r.ok
    still_works(pool)


def test_writing_outside_its_folder_reaches_nothing(pool, tmp_path):
    target = tmp_path / "escaped.txt"
    code = (f"for path in [{str(target)!r}, '/escaped.txt', '/tmp/../escaped.txt', "
            f"{str(REPO / 'escaped.txt')!r}]:\n"
            "    try:\n        open(path, 'w').write('x')\n        print('wrote', path)\n"
            "    except OSError as e:\n        print('refused', path, type(e).__name__)\n"
            "open('mine.txt', 'w').write('ok')\nprint(open('mine.txt').read())")
    r = pool.run(code)
    assert r.ok, r
    assert not target.exists() and not (REPO / "escaped.txt").exists()
    assert r.stdout.count("refused") >= 2 and r.stdout.endswith("ok\n")
    # Every program gets a fresh folder: the next one does not see mine.txt.
    assert pool.run("import os\nprint(os.listdir('.'))").stdout == "[]\n"


def test_parent_environment_is_invisible(pool):
    code = ("import os, glob\nprint(dict(os.environ))\n"
            "for p in ['/proc/self/environ', '/proc/1/environ', f'/proc/{os.getppid()}/environ']:\n"
            "    try:\n        print(open(p).read())\n    except OSError as e:\n        print(p, e)\n"
            "for p in glob.glob('/proc/*/environ'):\n"
            "    try:\n        print(open(p).read())\n    except OSError:\n        pass\n")
    r = pool.run(code)
    assert r.ok, r
    assert SECRET not in r.stdout + r.stderr_tail
    assert "STILLHOUSE_TEST_API_KEY" not in r.stdout
    assert os.environ["STILLHOUSE_TEST_API_KEY"] == SECRET  # it was there to be stolen


def test_no_connection_reaches_a_loopback_server(pool):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(5)
    port = server.getsockname()[1]
    accepted = []

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(server.accept())
            except OSError:
                pass

    stop = threading.Event()
    thread = threading.Thread(target=accept)
    thread.start()
    try:
        # The server itself is reachable from here (the check below could fail).
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        code = ("import socket, ctypes\n"
                f"try:\n    socket.create_connection(('127.0.0.1', {port}), timeout=1)\n    print('connected')\n"
                "except OSError as e:\n    print('refused', e)\n"
                # the raw syscall, past Python's socket module: socket(AF_INET, SOCK_STREAM, 0)
                "libc = ctypes.CDLL(None)\nprint('raw', libc.syscall(41, 2, 1, 0))\n")
        r = pool.run(code)
    finally:
        stop.set()
        thread.join()
    assert len(accepted) == 1, "only the test's own probe connection"
    for conn, _ in accepted:
        conn.close()
    server.close()
    assert r.ok and "connected" not in r.stdout, r
    if LEVEL >= 3:  # seccomp: not even a socket
        assert "raw -1" in r.stdout
    still_works(pool)


def test_spawning_shells_runs_nothing(pool, tmp_path):
    marker = tmp_path / "shell-ran"
    code = (f"import os, subprocess\nprint('system', os.system('touch {marker}; echo SHELL-RAN'))\n"
            f"try:\n    subprocess.run(['/bin/sh', '-c', 'touch {marker}'])\nexcept OSError as e:\n"
            "    print('refused', type(e).__name__)\n"
            f"try:\n    os.execv('/bin/sh', ['sh', '-c', 'touch {marker}'])\nexcept OSError as e:\n"
            "    print('exec refused', type(e).__name__)\n")
    r = pool.run(code)
    assert "SHELL-RAN" not in r.stdout and not marker.exists(), r
    assert "exec refused" in r.stdout
    still_works(pool)


@pytest.mark.parametrize("code", [
    "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)",
    "import os, signal\nos.kill(-1, signal.SIGKILL)",
    "import os, signal\nos.killpg(os.getpgid(os.getppid()), signal.SIGKILL)",
    "import os, signal\nfor pid in range(1, 200):\n    try:\n        os.kill(pid, signal.SIGKILL)\n"
    "    except OSError:\n        pass\nprint('done')",
], ids=["kill-parent", "kill-all", "kill-parent-group", "kill-every-pid"])
def test_signalling_the_parent_does_not_stop_the_pool(pool, code):
    restarts = pool.restarts
    pids = [w.proc.pid for w in pool._all]
    pool.run(code)
    still_works(pool)
    if LEVEL >= 3:  # seccomp denies every signal: not even a worker restart
        assert pool.restarts == restarts and [w.proc.pid for w in pool._all] == pids


def test_huge_output_is_capped(pool):
    for code in ("print('x' * 10**8)", "while True:\n    print('y' * 1000)"):
        r = pool.run(code)
        assert r.limit == "output" and len(r.stdout) <= LIMITS["output_bytes"], r
    still_works(pool)


def test_huge_files_hit_the_file_size_limit(pool):
    r = pool.run("open('big', 'wb').write(b'0' * (50 * 2**20))")
    assert r.limit == "file_size", r
    still_works(pool)


def test_deep_recursion_is_contained(pool):
    r = pool.run("def f(n):\n    return f(n + 1)\nf(0)")
    assert r.exit == 1 and "RecursionError" in r.stderr_tail
    r = pool.run("import sys\nsys.setrecursionlimit(10**8)\ndef f(n):\n    return f(n + 1)\nf(0)")
    assert not r.ok and (r.signal is not None or r.limit is not None), r
    still_works(pool)


def test_ctypes_tricks_are_contained(pool):
    r = pool.run("import ctypes\nctypes.string_at(0)")
    assert r.signal == 11 and r.failure.startswith("killed by signal 11"), r
    # ptrace(PTRACE_ATTACH, parent) through a raw syscall
    r = pool.run("import ctypes, os\nprint(ctypes.CDLL(None).syscall(101, 16, os.getppid(), 0, 0))")
    assert r.stdout == "-1\n", r
    still_works(pool)


def test_the_projects_packages_are_not_importable(pool):
    site = next(p for p in sys.path if p.endswith("site-packages"))
    code = (f"import sys\nsys.path[:0] = [{str(REPO)!r}, {site!r}, '/usr/lib/python3/dist-packages']\n"
            "for name in ['stillhouse', 'tasks', 'torch', 'prefect']:\n"
            "    try:\n        __import__(name)\n        print('imported', name)\n"
            "    except ImportError:\n        print('missing', name)\n")
    r = pool.run(code)
    assert r.ok and "imported" not in r.stdout and r.stdout.count("missing") == 4, r


def test_below_the_minimum_level_pot_refuses_and_runs_nothing(tmp_path):
    cfg = SandboxConfig(min_level=2, bwrap=str(tmp_path / "no-bwrap-here"))
    with pytest.raises(SandboxUnavailable, match="apt-get install bubblewrap") as err:
        SandboxPool(cfg)
    assert "level 1" in str(err.value)
    # The CLI says the same in one line and writes nothing.
    rows = tmp_path / "in.jsonl"
    rows.write_text(json.dumps({"reference": "1", "response": "print(1)"}) + "\n")
    proc = subprocess.run([sys.executable, "-m", "stillhouse.flows.cli", "verify", str(rows),
                           "--out", str(tmp_path / "out.jsonl"), "--rationale", "pot",
                           "--bwrap", str(tmp_path / "no-bwrap-here"), "--min-level", "2"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "apt-get install bubblewrap" in proc.stderr
    assert not (tmp_path / "out.jsonl").exists()


def test_verify_cli_scores_programs_and_reports_how_they_ended(tmp_path):
    rows = [
        {"reference": "42", "response": "Here it is.\n```python\na = 6\nprint(a * 7)\n```\nDone."},
        {"reference": "42", "response": "```python\nprint(6 * 8)\n```"},
        {"reference": "3", "response": "```python\nwhile True:\n    pass\n```"},
        {"reference": "3", "response": "```python\nprint('three')\n```"},
        {"reference": "3", "response": "print(1 + 2)"},
    ]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    proc = subprocess.run([sys.executable, "-m", "stillhouse.flows.cli", "verify", str(src),
                           "--out", str(out), "--rationale", "pot", "--min-level", str(LEVEL)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [g["correct"] for g in got] == [True, False, False, False, True]
    assert {g["isolation_level"] for g in got} == {LEVEL}
    assert got[0]["program_output"] == "42\n" and got[0]["program_exit"] == 0
    assert got[2]["program_limit"] in ("cpu", "wall") and "limit" in got[2]["error"]
    assert got[3]["extracted"] is None and got[3]["program_exit"] == 0
    assert json.loads(proc.stdout)["correct"] == 2


@pytest.mark.skipif(LEVEL < 2, reason="needs bubblewrap")
def test_without_seccomp_a_program_that_kills_its_worker_costs_a_restart(tmp_path):
    # Level 2 (seccomp "missing"): signals are possible inside the PID namespace, so a program can
    # take its worker down; the pool replaces it and reports the program as stopped by "worker".
    cfg = SandboxConfig(min_level=2, libseccomp=str(tmp_path / "no-libseccomp.so"), **LIMITS)
    with SandboxPool(cfg) as pool:
        assert pool.level == 2
        r = pool.run("import os\nos.kill(-1, 9)")
        assert r.limit == "worker" and pool.restarts == 1
        # A daemon left behind in a new session does not hold the worker, and is killed after.
        r = pool.run("import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(100)\n"
                     "print('parent done')")
        assert r.ok and r.stdout == "parent done\n" and r.seconds < LIMITS["wall_seconds"]
        r = pool.run("import os, json\nprint(json.dumps([p for p in os.listdir('/proc') if p.isdigit()]))")
        assert len(json.loads(r.stdout)) == 3, r  # init, the worker, this program: no daemon
        still_works(pool, level=2)
