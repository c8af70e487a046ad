"""Progress as the UI and the terminal show it: counts, rate, ETA, tokens/s and loss from the
progress calls of the backends and the trainer, and old two-argument callbacks still served."""

from __future__ import annotations

import doctest

import pytest

import stillhouse.flows.monitoring as monitoring
import stillhouse.tasks.backends.base as base
from stillhouse.flows.monitoring import ProgressMeter, ProgressReporter
from stillhouse.tasks.backends.base import accepting_info

pytestmark = pytest.mark.unit


def test_rate_and_eta_count_from_the_first_call():
    m = ProgressMeter("samples")
    m.update(20, 100, now=50.0)  # 20 reused on a resume: neither in the rate nor in the time
    assert m.rate is None and m.eta_s is None and m.text() == "20/100 samples (20%)"
    m.update(40, 100, now=60.0)
    assert m.rate == pytest.approx(2.0)
    assert m.eta_s == pytest.approx(30.0)
    assert m.text() == "40/100 samples (40%) · 2.00 samples/s · ETA 0:30"
    m.update(100, 100, now=80.0)
    assert "ETA" not in m.text() and m.text().startswith("100/100 samples (100%) · 2.67 samples/s")


def test_tokens_per_second_sums_increments_after_the_first_call():
    m = ProgressMeter()
    m.update(1, 4, now=0.0, tokens=999)
    m.update(2, 4, now=2.0, tokens=300)
    m.update(3, 4, now=4.0, tokens=500)
    assert m.tokens_per_s == pytest.approx(200.0)
    assert "200 tokens/s" in m.text()


def test_loss_shown_is_the_mean_since_the_last_text_and_stays_until_a_new_one():
    m = ProgressMeter("steps")
    for step, loss in enumerate([4.0, 2.0, 3.0], start=1):
        m.update(step, 10, now=float(step), tokens=10, loss=loss)
    assert "loss 3.0000" in m.text()
    m.update(4, 10, now=4.0, tokens=10, loss=1.0)
    assert "loss 1.0000" in m.text()
    m.update(5, 10, now=5.0, tokens=10)
    assert "loss 1.0000" in m.text()


def test_a_new_total_or_a_count_going_back_starts_a_new_phase():
    m = ProgressMeter()
    m.update(10, 20, now=0.0)
    m.update(20, 20, now=10.0)
    assert m.rate == pytest.approx(1.0)
    m.update(4, 8, now=11.0)  # evaluation: the eval sets are done, the pool begins
    assert m.rate is None and m.text() == "4/8 it (50%)"
    m.update(8, 8, now=13.0)
    assert m.rate == pytest.approx(2.0)


def test_keys_a_meter_does_not_know_are_ignored():
    m = ProgressMeter()
    m.update(1, 2, now=0.0, shard=3, worker="a")
    assert m.text() == "1/2 it (50%)"


def test_old_two_argument_callbacks_keep_working_and_new_ones_get_the_info():
    seen = []
    accepting_info(lambda d, t: seen.append((d, t)))(3, 4, tokens=7, loss=0.5)
    accepting_info(lambda d, t, **info: seen.append(info))(3, 4, tokens=7)
    assert seen == [(3, 4), {"tokens": 7}]
    assert accepting_info(None) is None


def test_reporter_without_an_artifact_adds_tokens_per_second_to_its_bar(monkeypatch):
    # Where Prefect gives no artifact (it would start an ephemeral server here: 10 s and a database
    # write), the bar still works; its postfix adds tokens/s to tqdm's own count, rate and ETA.
    def no_artifact(**_):
        raise RuntimeError("no flow run")

    monkeypatch.setattr(monitoring, "create_progress_artifact", no_artifact)
    r = ProgressReporter("unit test", unit="samples", bar_interval_s=0.0)
    try:
        r(2, 8, tokens=10)
        r(8, 8, tokens=30)
        assert r._bar.n == 8 and "tokens/s" in r._bar.postfix and "samples/s" not in r._bar.postfix
    finally:
        r.close()


@pytest.mark.parametrize("module", [monitoring, base])
def test_docstring_examples_run(module):
    result = doctest.testmod(module)
    assert result.attempted and not result.failed
