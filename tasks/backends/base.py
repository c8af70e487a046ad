"""The interface every teacher/student sampling backend implements.

A backend is a small object with one method, `sample(requests, params, progress=None)`. Callers
(sampling, evaluation, synthesis, the flows) only see these dataclasses, so the hf, vllm and openai
backends drop in without touching them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

# progress(done, total, **info): called as completions finish, so the CLI and Prefect can show
# progress. Optional info keys: tokens (tokens generated or trained since the previous call: an
# increment, so that shards and wrappers can pass it on unchanged) and loss (training). A callback
# may accept **info (flows/monitoring.py ProgressReporter shows what it gets); callers pass it through
# `accepting_info`, so a callback written as progress(done, total) keeps working.
Progress = Callable[..., None]


def accepting_info(progress: Progress | None) -> Progress | None:
    """`progress` if it takes the optional info keywords, else a wrapper that drops them.

    >>> seen = []
    >>> accepting_info(lambda d, t: seen.append((d, t)))(1, 2, tokens=5)
    >>> accepting_info(lambda d, t, **info: seen.append(info))(1, 2, tokens=5)
    >>> seen
    [(1, 2), {'tokens': 5}]
    """
    import inspect

    if progress is None:
        return None
    try:
        params = inspect.signature(progress).parameters.values()
    except (TypeError, ValueError):  # a builtin or C callable: call it the old way
        params = ()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return progress
    return lambda done, total, **_info: progress(done, total)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.7
    top_p: float = 1.0
    max_new_tokens: int = 512
    stop: tuple[str, ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @classmethod
    def from_config(cls, sampling) -> SamplingParams:
        """The teacher's solve parameters from the run config's `sampling` section (the one place
        they are built: teacher sampling and synthesis's reference votes both use them)."""
        return cls(
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            max_new_tokens=sampling.max_new_tokens,
            stop=tuple(sampling.stop),
        )


@dataclass(frozen=True)
class SampleRequest:
    """One completion to produce: the chat messages and the seed that makes it reproducible.

    `key` and `sample_index` identify it (e.g. problem id and 0..N-1); the seed is derived from
    them, never from the position in a batch, so a resumed run regenerates exactly what is missing.
    """

    key: str
    sample_index: int
    messages: tuple[dict[str, str], ...]
    seed: int


@dataclass(frozen=True)
class Completion:
    key: str
    sample_index: int
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (EOS or stop string) or "length"
    extra: dict = field(default_factory=dict, compare=False)


class Backend(Protocol):
    name: str

    def sample(
        self,
        requests: list[SampleRequest],
        params: SamplingParams,
        progress: Progress | None = None,
    ) -> list[Completion]:
        """Return one Completion per request, in the order of `requests`."""
        ...

    def close(self) -> None:
        """Free the model (GPU memory, worker processes)."""
        ...


def derive_seed(base_seed: int, key: str, sample_index: int) -> int:
    """A 63-bit seed from (base seed, key, sample index), stable across processes and machines."""
    digest = hashlib.sha256(f"{base_seed}\x1f{key}\x1f{sample_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
