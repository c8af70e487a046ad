"""Fixtures of the server tests: a real Prefect server per test, models shared by the session.

The helpers live in tests/server/harness.py (importable by the tests; a conftest is not).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.server.harness import Procs, Server, child_env, free_port, wait_healthy


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    """Shared by every child of the session: tiny-tutor and tiny-llama are built there once."""
    return tmp_path_factory.mktemp("server-models")


@pytest.fixture
def server(tmp_path, models_dir):
    """`prefect server start` on a free port with its own PREFECT_HOME; stopped at teardown."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    procs = Procs(tmp_path / "logs", child_env(tmp_path / "prefect-home", models_dir, url))
    try:
        proc = procs.start(
            "server",
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        )
        startup = wait_healthy(url, proc)
        yield Server(procs, proc, url, startup)
    finally:
        procs.stop_all()
