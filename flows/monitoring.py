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


class ProgressReporter:
    """progress(done, total) -> a Prefect progress artifact and a tqdm bar, throttled.

    Backends and the trainer call it after each finished batch, shard or optimizer step: a safe
    point, where a stop asked for by Ctrl-C takes effect (flows/lifecycle.py)."""

    def __init__(self, description: str, min_interval_s: float = 2.0):
        self.description = description
        self.min_interval_s = min_interval_s
        self._artifact = None
        self._bar: tqdm | None = None
        self._last = 0.0

    def __call__(self, done: int, total: int) -> None:
        safe_point()
        if self._bar is None:
            self._bar = tqdm(total=total, desc=self.description, unit="it", leave=False)
            try:
                self._artifact = create_progress_artifact(progress=0.0, description=self.description)
            except Exception:  # outside a run context the UI simply gets no progress artifact
                log.debug("no progress artifact for %s", self.description, exc_info=True)
        self._bar.total = total
        self._bar.n = done
        self._bar.refresh()
        now = time.monotonic()
        if self._artifact is not None and (done >= total or now - self._last >= self.min_interval_s):
            self._last = now
            update_progress_artifact(self._artifact, progress=100.0 * done / max(total, 1))

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
