"""`stillhouse ui --port N`: the UI served there talks to the API on port N, not Prefect's 4200."""

from __future__ import annotations

import json
import sys
import urllib.request

import pytest

from tests.server.harness import Procs, child_env, free_port, wait_healthy

pytestmark = pytest.mark.server


def test_ui_on_a_non_default_port_points_its_api_url_at_that_port(tmp_path):
    port = free_port()
    assert port != 4200
    # No PREFECT_API_URL in the environment: the case of a user who just runs `stillhouse ui`.
    procs = Procs(tmp_path / "logs", child_env(tmp_path / "prefect-home", tmp_path / "models", None))
    try:
        proc = procs.start("ui", [sys.executable, "-m", "stillhouse.flows.cli", "ui", "--port", str(port)])
        wait_healthy(f"http://127.0.0.1:{port}/api", proc)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ui-settings", timeout=10) as resp:
            settings = json.loads(resp.read())
        assert settings["api_url"] == f"http://127.0.0.1:{port}/api", (settings, procs.log("ui"))
    finally:
        procs.stop_all()
