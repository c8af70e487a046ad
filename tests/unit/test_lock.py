import subprocess
import sys

import pytest

from stillhouse.storage.lock import RunLock, RunLockedError

pytestmark = pytest.mark.unit

HOLD = """
import sys, time
from stillhouse.storage.lock import RunLock
lock = RunLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(60)
"""


def test_second_holder_fails_at_once_and_lock_dies_with_process(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(RunLockedError, match=f"in use by pid {proc.pid}"):
            RunLock(tmp_path).acquire()
    finally:
        proc.kill()
        proc.wait()
    # SIGKILL released it: no stale lock
    with RunLock(tmp_path):
        pass


def test_reacquire_after_release(tmp_path):
    lock = RunLock(tmp_path).acquire()
    lock.release()
    with RunLock(tmp_path):
        with pytest.raises(RunLockedError):
            RunLock(tmp_path).acquire()
