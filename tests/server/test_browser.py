"""The Prefect UI as a user sees it: headless Chromium opens a smoke run's pages on a real server
(started the way `stillhouse ui --port N` starts it, on a port that is not 4200) and finds the
round's numbers in the rendered page.

What it looks for, read from the run's own summary (<workdir>/rounds/round-0.json), so that any
honest rendering of the round passes:
- flow-run page of `<run>-round-0`, Artifacts tab: the run's state, the round artifact and the
  sampling progress artifact's "<samples>/<samples> samples";
- the round artifact's page: the teacher accuracy with 3 decimals, the pool size as a number next to
  the word "pool", and the round's dataset version ("snapshot <id>").
Both of Prefect's UIs (V1 and V2, as /ui-settings lists them) are checked. A screenshot of each
page is kept in the test's tmp folder (browser/<ui>-*.png).
"""

from __future__ import annotations

import json
import re
import sys
import time
import urllib.request

import pytest

from tests.server.browser import Browser, chromium_binary
from tests.server.harness import SMOKE, Procs, child_env, free_port, wait_healthy

CHROMIUM = chromium_binary()
pytestmark = [
    pytest.mark.browser, pytest.mark.server, pytest.mark.integration,
    # A mark, not a fixture: the skip comes before the session's tiny-tutor build.
    pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium: Debian package `chromium` "
                       "(deployment/apt-packages.txt; `make system-deps` installs it as root)"),
]


def test_flow_run_and_round_artifact_pages_show_the_rounds_numbers(tmp_path, prepared_models_dir, tutor_dir):
    port = free_port()
    ui_url, api_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port}/api"
    home = tmp_path / "prefect-home"
    procs = Procs(tmp_path / "logs", child_env(home, prepared_models_dir, api_url))
    browser = None
    try:
        # The UI server as `stillhouse ui` starts it: no PREFECT_API_URL of its own.
        ui = procs.start("ui", [sys.executable, "-m", "stillhouse.flows.cli", "ui", "--port", str(port)],
                         env=child_env(home, prepared_models_dir, None))
        wait_healthy(api_url, ui)
        workdir = tmp_path / "run"
        t0 = time.monotonic()
        procs.run(sys.executable, "-m", "stillhouse.flows.cli", "run", str(SMOKE), "--workdir", str(workdir),
                  "--rounds", "1", timeout=900)
        run_s = time.monotonic() - t0
        summary = json.loads((workdir / "rounds" / "round-0.json").read_text())

        from prefect.client.orchestration import SyncPrefectClient

        with SyncPrefectClient(api_url) as client:
            round_run = next(r for r in client.read_flow_runs() if r.name.endswith("-round-0"))
            artifacts = client.read_artifacts()
        round_artifact = next(a for a in artifacts if a.key and "round-0" in a.key and a.type != "progress")

        with urllib.request.urlopen(f"{ui_url}/ui-settings", timeout=10) as resp:
            settings = json.loads(resp.read())
        # Both of Prefect's UIs: V2 is what a browser without a saved choice lands on.
        uis = {v: settings[f"{v}_base_url"].rstrip("/") for v in settings.get("available_uis", ["v1"])}
        assert uis, settings

        t1 = time.monotonic()
        browser = Browser(CHROMIUM, tmp_path / "chromium-profile")
        shots = tmp_path / "browser"
        shots.mkdir()
        check_pages(browser, ui_url, uis, round_run, round_artifact, summary, shots)
        print(f"browser check: smoke run {run_s:.0f} s, pages {time.monotonic() - t1:.0f} s; screenshots in {shots}")
    finally:
        if browser is not None:
            browser.close()
        procs.stop_all()


def check_pages(browser: Browser, ui_url: str, uis: dict[str, str], round_run, round_artifact,
                summary: dict, shots) -> None:
    """The round's flow-run page (Artifacts tab) and its artifact's page, in every UI of `uis`."""
    samples = summary["samples"]
    progress = f"{samples}/{samples} samples"  # the sampling step's progress artifact
    acc = summary["teacher_accuracy"]
    shown = {f"{acc:.3f}"}
    for ui_name, base in uis.items():
        # The flow run's Artifacts tab: V2 opens it from the URL, V1 on a click.
        browser.open(f"{ui_url}{base}/runs/flow-run/{round_run.id}?tab=Artifacts")
        text = browser.wait_for_text([round_run.name, "Completed", "Artifacts"])
        if progress not in text:
            time.sleep(2)
            if progress not in browser.text():
                browser.click_text("Artifacts")
        browser.wait_for_text([round_artifact.key, progress])
        browser.screenshot(shots / f"{ui_name}-flow-run.png")

        browser.open(f"{ui_url}{base}/artifacts/artifact/{round_artifact.id}")
        pool = re.compile(rf"pool[^\d\n]*\s*{summary['pool']}(?![\d.])", re.I)
        try:
            version = f"snapshot {summary['snapshot']}"
            browser.wait_for(lambda text: round_artifact.key in text and any(s in text for s in shown)
                             and pool.search(text) is not None and version in text,
                             f"{ui_name}: teacher accuracy {sorted(shown)}, 'pool ... {summary['pool']}', {version!r}")
        finally:
            browser.screenshot(shots / f"{ui_name}-round-artifact.png")
