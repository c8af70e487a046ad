"""What a user watching the run sees: Prefect artifacts in the UI and progress bars in the terminal."""

from __future__ import annotations

import logging
import time
from typing import Any

from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    update_progress_artifact,
)
from tqdm.auto import tqdm

from stillhouse.flows.lifecycle import safe_point

log = logging.getLogger(__name__)


# Letters that Unicode decomposition does not reduce to ASCII.
_TRANSLITERATE = str.maketrans({"ß": "ss", "æ": "ae", "œ": "oe", "ø": "o", "đ": "d", "ł": "l", "þ": "th",
                                "ð": "d", "ı": "i"})


def artifact_key(text: str) -> str:
    """A Prefect artifact key for `text`: lowercase ASCII letters, digits and dashes only.

    An ASCII name keeps its old key ("My_Run-round-1" -> "my-run-round-1"). Any other name is
    transliterated ("Präzision" -> "prazision") and gets a short hash of the name as a suffix, so
    that "Präzision" and "Prazision", or two names in a script with no Latin letters at all, never
    share a key.

    >>> artifact_key("smoke-round-1"), artifact_key("Präzision-report")
    ('smoke-round-1', 'prazision-report-894ea78a')
    >>> artifact_key("精度-round-0")
    'round-0-3946db17'
    """
    import hashlib
    import re
    import unicodedata

    if text.isascii():
        return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")
    folded = unicodedata.normalize("NFKD", text.lower().translate(_TRANSLITERATE))
    ascii_text = "".join(c for c in folded if c.isascii() and not unicodedata.combining(c))
    slug = re.sub(r"-+", "-", "".join(c if c.isalnum() else "-" for c in ascii_text)).strip("-")
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:8]
    return f"{slug}-{digest}" if slug else digest


def _duration(seconds: float) -> str:
    """H:MM:SS or M:SS, as tqdm shows times.

    >>> _duration(7), _duration(125.4), _duration(3725)
    ('0:07', '2:05', '1:02:05')
    """
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class ProgressMeter:
    """done/total, rate, ETA, tokens/s and loss of one step, from the progress calls it is given.

    Rates count from the first call on: work done before it (shards or completions reused on a
    resume, the model load) is in neither the numerator nor the time, so the ETA is that of the
    work still running. Tokens are increments (base.py's Progress); the loss shown is the mean of
    the losses reported since the last `text()`, which smooths single-step noise.

    >>> m = ProgressMeter("samples")
    >>> m.update(16, 64, now=100.0, tokens=500)
    >>> m.text()
    '16/64 samples (25%)'
    >>> m.update(48, 64, now=108.0, tokens=1000)
    >>> m.text()
    '48/64 samples (75%) · 4.00 samples/s · ETA 0:04 · 125 tokens/s'
    """

    def __init__(self, unit: str = "it"):
        self.unit = unit
        self.done = self.total = 0
        self._t0: float | None = None
        self._done0 = 0
        self._now = 0.0
        self._tokens = 0  # since the first call
        self._losses: list[float] = []
        self._loss: float | None = None

    def update(self, done: int, total: int, now: float, tokens: int | None = None,
               loss: float | None = None, **_: Any) -> None:
        """One progress call; keys this meter does not know (a newer caller's) are ignored.

        A new total or a count that goes back starts a new phase (evaluation samples the eval
        sets, then the pool; synthesis generates, then solves): rates restart with it."""
        if self._t0 is None or total != self.total or done < self.done:
            self._t0, self._done0, self._tokens = now, done, 0
        elif tokens:
            self._tokens += int(tokens)
        self.done, self.total, self._now = done, total, now
        if loss is not None:
            self._losses.append(float(loss))

    @property
    def rate(self) -> float | None:
        """Units per second since the first call; None before any time has passed."""
        elapsed = self._now - (self._t0 if self._t0 is not None else self._now)
        return (self.done - self._done0) / elapsed if elapsed > 0 else None

    @property
    def eta_s(self) -> float | None:
        rate = self.rate
        return max(self.total - self.done, 0) / rate if rate else None

    @property
    def tokens_per_s(self) -> float | None:
        elapsed = self._now - (self._t0 if self._t0 is not None else self._now)
        return self._tokens / elapsed if elapsed > 0 and self._tokens else None

    def fields(self) -> dict[str, str]:
        """What is known now, formatted: rate, eta, tokens/s, loss (a key is absent when unknown)."""
        if self._losses:
            self._loss, self._losses = sum(self._losses) / len(self._losses), []
        out = {}
        if self.rate:
            out["rate"] = f"{self.rate:.2f} {self.unit}/s"
        if self.eta_s is not None and self.done < self.total:
            out["eta"] = f"ETA {_duration(self.eta_s)}"
        if self.tokens_per_s:
            out["tokens"] = f"{self.tokens_per_s:.0f} tokens/s"
        if self._loss is not None:
            out["loss"] = f"loss {self._loss:.4f}"
        return out

    def text(self, fields: dict[str, str] | None = None) -> str:
        pct = 100 * self.done // max(self.total, 1)
        shown = self.fields() if fields is None else fields
        return " · ".join([f"{self.done}/{self.total} {self.unit} ({pct}%)", *shown.values()])


class ProgressReporter:
    """progress(done, total, **info) -> a Prefect progress artifact and a tqdm bar, throttled.

    The artifact's description carries the counts, rate, ETA and, where the caller reports them,
    tokens/s and the training loss (ProgressMeter); the bar's postfix adds the last two to tqdm's own. Backends and the trainer
    call it after each finished batch, shard, completion or optimizer step: a safe point, where a
    stop asked for by Ctrl-C takes effect (flows/lifecycle.py). The artifact is updated at most
    every `min_interval_s` (each update is an API call) and the bar at most every `bar_interval_s`
    (the openai backend calls once per completion), both always on the last call."""

    def __init__(self, description: str, unit: str = "it", min_interval_s: float = 2.0,
                 bar_interval_s: float = 0.5):
        self.description = description
        self.min_interval_s = min_interval_s
        self.bar_interval_s = bar_interval_s
        self.meter = ProgressMeter(unit)
        self._artifact = None
        self._bar: tqdm | None = None
        self._last = self._last_bar = float("-inf")

    def __call__(self, done: int, total: int, **info: Any) -> None:
        safe_point()
        now = time.monotonic()
        self.meter.update(done, total, now, **info)
        if self._bar is None:
            self._bar = tqdm(total=total, desc=self.description, unit=self.meter.unit, leave=False)
            try:
                self._artifact = create_progress_artifact(progress=0.0, description=self.description)
            except Exception:  # outside a run context the UI simply gets no progress artifact
                log.debug("no progress artifact for %s", self.description, exc_info=True)
        last = done >= total
        bar_due = last or now - self._last_bar >= self.bar_interval_s
        artifact_due = self._artifact is not None and (last or now - self._last >= self.min_interval_s)
        if not (bar_due or artifact_due):
            return
        fields = self.meter.fields()
        if bar_due:
            self._last_bar = now
            self._bar.total, self._bar.n = total, done
            # tqdm shows counts, rate and ETA itself: the postfix adds what it cannot know.
            self._bar.set_postfix_str(" · ".join(v for k, v in fields.items() if k in ("tokens", "loss")),
                                      refresh=False)
            self._bar.refresh()
        if artifact_due:
            self._last = now
            update_progress_artifact(self._artifact, progress=100.0 * done / max(total, 1),
                                     description=f"{self.description}: {self.meter.text(fields)}")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def publish_round(label: str, markdown: str, round: int) -> None:
    """The round's page: a Markdown artifact keyed by the run's label and the round."""
    create_markdown_artifact(key=artifact_key(f"{label}-round-{round}"), markdown=markdown,
                             description=f"{label}: round {round}")


def publish_report(label: str, markdown: str) -> None:
    create_markdown_artifact(key=artifact_key(f"{label}-report"), markdown=markdown,
                             description=f"{label}: accuracy across rounds")
