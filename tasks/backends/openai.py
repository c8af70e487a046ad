"""The `openai` backend: any OpenAI-compatible chat server (`vllm serve`, SGLang, hosted APIs).

Requests go to `<base_url>/chat/completions` from an httpx.AsyncClient, at most `max_concurrency`
in flight. The model name sent is ModelConfig.name_or_path (the served model name).

Seeds and `n`
-------------
Every SampleRequest carries its own seed. By default each request is one HTTP call with `n=1` and
`seed=request.seed`, so on a server that honours seeds (vLLM, SGLang) a sample's text depends only on
(prompt, params, seed): a resumed run regenerates exactly what an uninterrupted one would have, and
usage is exact per sample. The price is that the prompt travels (and on hosted APIs is billed) once
per sample; vLLM's prefix cache makes the repeated prefill almost free on a self-hosted fleet.

With `use_n=True` a problem's consecutive sample indices go out as one call with `n=k` and the seed
of the first of them. Hosted APIs then bill the prompt once, but the k samples share one seed, so a
rerun that regroups them (some already received) gets different, equally valid samples, and the
server reports completion tokens for the whole call only: per-sample completion_tokens are then an
estimate (choices that hit the length limit get max_new_tokens, the rest share the remainder in
proportion to their text length; `extra["usage_estimated"]` is set). A server that ignores `n` (fewer
choices than asked) is detected: the choices received are used and the rest are sent one request at a
time with their own seeds, and the backend stops asking for n > 1 for the rest of its life.

Retries
-------
429, 408, 409, 5xx, timeouts, connection errors and truncated/invalid JSON replies are retried up to
`max_retries` times. The wait before retry i (0-based) is `retry_backoff_s * 2**i`, capped at
MAX_BACKOFF_S, with "equal jitter" (half fixed, half random) so a fleet of clients does not retry in
lock-step yet the waits still grow. A Retry-After header (seconds or HTTP date) replaces the backoff;
one longer than MAX_RETRY_AFTER_S fails at once instead of silently waiting that long. The time
spent on one call is therefore bounded by (max_retries + 1) * request_timeout_s plus the waits.
Any other 4xx fails at once, naming the request key and quoting the server's error body (truncated).
After the first failure no new calls start and no call retries again; calls already in flight finish
their current attempt, so what the server has produced is still kept.

Persistence
-----------
Every completion is appended to a JSONL journal as soon as it arrives (one line per completion,
flushed and fsync'ed), under `<journal_dir>/<scope>/` where the scope hashes what shapes the text:
base_url, model name, sampling params and the seed mode. A record is keyed by (key, sample_index,
seed, messages). Each backend instance writes its own file (one writer per file: no interleaving,
and a torn last line after a kill is skipped on reading and never appended to). A rerun of the same
requests reads every file of the scope and only sends what is missing, so a killed run never pays
twice for a response it received.

The API key is read from the environment variable named by `api_key_env`, sent as a Bearer token,
and kept out of the journal, cache keys, logs and error messages (server bodies that echo it are
redacted).

Model output is hostile text: it is stored as a string and never evaluated.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import email.utils
import json
import logging
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from stillhouse.tasks.backends.base import Completion, Progress, SampleRequest, SamplingParams, accepting_info
from stillhouse.tasks.backends.journal import JOURNAL_VERSION, Journal, completion_of, record_id, record_of, scope_id
from stillhouse.tasks.redact import Redactor, check_base_url, clean_secret

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 60.0  # the longest computed wait between two attempts
MAX_RETRY_AFTER_S = 300.0  # a server asking for a longer pause fails the call instead
_BODY_CHARS = 500  # how much of a server's error body goes into an error message
_RETRY_STATUS = frozenset({408, 409, 429})  # plus every 5xx

# finish_reason values of OpenAI-compatible servers mapped to ours; "abort" (vLLM: the engine dropped
# the request) and a missing reason mean the text is incomplete, so the call is retried instead.
_FINISH = {
    "stop": "stop", "eos": "stop", "end_turn": "stop", "stop_sequence": "stop",
    "tool_calls": "stop", "function_call": "stop", "content_filter": "stop",
    "length": "length", "max_tokens": "length",
}
_INCOMPLETE = frozenset({None, "abort"})


class OpenAIBackendError(RuntimeError):
    """A call failed for good: not retryable, or retries exhausted. The message names the request.

    `transient`: the failure may go away if the whole step is tried again later (the server was
    down, overloaded or slow), as opposed to a request the server refused."""

    def __init__(self, message: str, *, transient: bool = False):
        super().__init__(message)
        self.transient = transient


def _retry_after_s(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date); None if absent/unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - time.time())


@dataclass
class _Stats:
    """What the backend did; tests and benches read these."""

    reused: int = 0  # completions taken from the journal
    generated: int = 0  # completions received from the server
    calls: int = 0  # successful HTTP calls
    attempts: int = 0  # HTTP attempts, failed ones included
    prompt_tokens: int = 0
    completion_tokens: int = 0


class OpenAIBackend:
    """Backend for an OpenAI-compatible `/chat/completions` endpoint; see the module docstring."""

    name = "openai"

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        journal_dir: str | Path,
        api_key_env: str | None = None,
        max_concurrency: int = 32,
        request_timeout_s: float = 300.0,
        max_retries: int = 6,
        retry_backoff_s: float = 1.0,
        use_n: bool = False,
    ):
        if not base_url:
            raise ValueError("openai backend needs base_url, e.g. http://127.0.0.1:8000/v1")
        self.base_url = check_base_url(base_url).rstrip("/")
        self.url = self.base_url + "/chat/completions"
        self.model = model
        self.journal_dir = Path(journal_dir)
        self.max_concurrency = max_concurrency
        self.request_timeout_s = request_timeout_s
        self.max_retries = max_retries
        self.retry_backoff_s = retry_backoff_s
        self.use_n = use_n
        self._api_key: str | None = None
        self._redact = Redactor()
        if api_key_env:
            key = os.environ.get(api_key_env)
            if not key:
                # Name the variable, never a value.
                raise ValueError(
                    f"openai backend: environment variable {api_key_env} (api_key_env) is not set"
                )
            # Keys mounted from files end in a newline; httpx refuses such a header and quotes it,
            # escaped, in its error. Both the raw and the cleaned key are redacted everywhere.
            self._redact = Redactor([key, key.strip()])
            try:
                key = clean_secret(key)
            except ValueError:
                raise ValueError(
                    f"openai backend: the API key in {api_key_env} (api_key_env) has whitespace or "
                    "control characters inside it"
                ) from None
            self._api_key = key
        self._n_supported = True  # cleared when a server returns fewer choices than `n`
        self._journals: dict[str, Journal] = {}
        self.stats = _Stats()

    @classmethod
    def from_config(cls, model: Any, journal_dir: str | Path) -> OpenAIBackend:
        """Build from a stillhouse.tasks.config.ModelConfig."""
        return cls(
            model.base_url,
            model.name_or_path,
            journal_dir=journal_dir,
            api_key_env=model.api_key_env,
            max_concurrency=model.max_concurrency,
            request_timeout_s=model.request_timeout_s,
            max_retries=model.max_retries,
            retry_backoff_s=model.retry_backoff_s,
            use_n=model.use_n,
        )

    def __repr__(self) -> str:  # no key here, ever
        return f"OpenAIBackend({self.base_url!r}, model={self.model!r})"

    # ------------------------------------------------------------------ redaction and messages

    def _body_snippet(self, resp: httpx.Response) -> str:
        try:
            body = resp.text
        except Exception:  # undecodable body: say so rather than fail while failing
            body = "<unreadable body>"
        body = " ".join(body.split())
        if len(body) > _BODY_CHARS:
            body = body[:_BODY_CHARS] + f"... [{len(body) - _BODY_CHARS} more chars]"
        return self._redact(body)

    @staticmethod
    def _describe(chunk: list[SampleRequest]) -> str:
        first, last = chunk[0], chunk[-1]
        idx = str(first.sample_index) if len(chunk) == 1 else f"{first.sample_index}..{last.sample_index}"
        return f"request key={first.key!r} sample_index={idx}"

    # ------------------------------------------------------------------ journal

    def _journal(self, params: SamplingParams) -> Journal:
        scope = {
            "v": JOURNAL_VERSION,
            "base_url": self.base_url,
            "model": self.model,
            "params": asdict(params),
            "seeds": "n-per-call" if self.use_n else "per-request",
        }
        sid = scope_id(scope)
        if sid not in self._journals:
            self._journals[sid] = Journal(self.journal_dir / sid, scope)
        return self._journals[sid]

    # ------------------------------------------------------------------ sample

    def sample(
        self,
        requests: list[SampleRequest],
        params: SamplingParams,
        progress: Progress | None = None,
    ) -> list[Completion]:
        if not requests:
            return []
        journal = self._journal(params)
        progress = accepting_info(progress)
        total = len(requests)
        results: dict[str, Completion] = {}
        missing: list[SampleRequest] = []
        seen: set[str] = set()
        for r in requests:
            rid = record_id(r)
            rec = journal.records.get(rid)
            if rec is not None:
                results[rid] = completion_of(rec)
            elif rid not in seen:
                seen.add(rid)
                missing.append(r)
        self.stats.reused += len(results)
        if results:
            log.info(
                "openai: %d of %d completions reused from journal %s", len(results), total, journal.folder
            )
        if progress:
            progress(total - len(missing), total)
        if missing:
            _run_coroutine(self._run(missing, params, journal, results, progress, total))
        return [results[record_id(r)] for r in requests]

    def _groups(self, missing: list[SampleRequest]) -> list[list[SampleRequest]]:
        """n=1 per request, or (use_n) runs of consecutive sample indices of one prompt."""
        if not self.use_n:
            return [[r] for r in missing]
        groups: list[list[SampleRequest]] = []
        for r in missing:
            prev = groups[-1][-1] if groups else None
            if (
                prev is not None
                and prev.key == r.key
                and prev.messages == r.messages
                and prev.sample_index + 1 == r.sample_index
            ):
                groups[-1].append(r)
            else:
                groups.append([r])
        return groups

    async def _run(
        self,
        missing: list[SampleRequest],
        params: SamplingParams,
        journal: Journal,
        results: dict[str, Completion],
        progress: Progress | None,
        total: int,
    ) -> None:
        stop = asyncio.Event()  # set on the first fatal error: nothing new starts, nothing retries
        slots = asyncio.Semaphore(self.max_concurrency)
        headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
        limits = httpx.Limits(
            max_connections=self.max_concurrency, max_keepalive_connections=self.max_concurrency
        )
        done = total - len(missing)

        errors: list[BaseException] = []  # in the order they happened

        async def one_group(group: list[SampleRequest]) -> None:
            try:
                await send_group(group)
            except BaseException as err:
                # Set synchronously, before this task yields: the semaphore slot it just released
                # must not let a waiting call start one more request.
                errors.append(err)
                stop.set()
                raise

        async def send_group(group: list[SampleRequest]) -> None:
            nonlocal done
            remaining = group
            while remaining:
                async with slots:
                    if stop.is_set():
                        return
                    # Decided once a slot is free: a reply that just showed `n` is ignored counts.
                    chunk = remaining if self._n_supported else remaining[:1]
                    data = await self._post(client, chunk, params, stop)
                if data is None:  # stopped while retrying
                    return
                completions = self._parse(data, chunk, params)
                if len(completions) < len(chunk) and self._n_supported:
                    self._n_supported = False
                    log.warning(
                        "openai: %s returned %d choice(s) for n=%d; "
                        "sending one request per sample from now on",
                        self.url, len(completions), len(chunk),
                    )
                for req, comp in zip(chunk, completions):
                    rid = record_id(req)
                    journal.append(record_of(rid, req, comp))
                    results[rid] = comp
                    self.stats.generated += 1
                    self.stats.prompt_tokens += comp.prompt_tokens
                    self.stats.completion_tokens += comp.completion_tokens
                    done += 1
                    if progress:
                        progress(done, total, tokens=comp.completion_tokens)
                remaining = remaining[len(completions):]

        async with httpx.AsyncClient(
            headers=headers, timeout=httpx.Timeout(self.request_timeout_s), limits=limits
        ) as client:
            tasks = [asyncio.ensure_future(one_group(g)) for g in self._groups(missing)]
            await asyncio.gather(*tasks, return_exceptions=True)
        if errors:
            first = errors[0]
            if isinstance(first, OpenAIBackendError):
                have = sum(1 for r in missing if record_id(r) in results)
                raise OpenAIBackendError(
                    self._redact(
                        f"{first} -- {have} of {len(missing)} new completions were received before "
                        f"the failure and are kept in the journal {journal.folder}; a rerun sends "
                        f"only the missing ones"
                    ),
                    transient=first.transient,
                ) from None
            if isinstance(first, Exception):
                # Not ours (a bug, a client library's error): its message may quote the key.
                raise OpenAIBackendError(
                    f"openai backend: {type(first).__name__}: {self._redact(str(first))}"
                ) from None
            raise first

    def _body(self, chunk: list[SampleRequest], params: SamplingParams) -> dict:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": list(chunk[0].messages),
            "n": len(chunk),
            "seed": chunk[0].seed,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "max_tokens": params.max_new_tokens,
        }
        if params.stop:
            body["stop"] = list(params.stop)
        return body

    async def _post(
        self,
        client: httpx.AsyncClient,
        chunk: list[SampleRequest],
        params: SamplingParams,
        stop: asyncio.Event,
    ) -> dict | None:
        """One call with retries: the decoded reply, None if stopped, or OpenAIBackendError."""
        body = self._body(chunk, params)
        what = self._describe(chunk)
        t0 = time.monotonic()
        for attempt in range(self.max_retries + 1):
            if stop.is_set():
                return None
            self.stats.attempts += 1
            retry_after: float | None = None
            try:
                resp = await client.post(self.url, json=body)
            except httpx.TimeoutException:
                reason = f"no reply within request_timeout_s={self.request_timeout_s}"
            except httpx.TransportError as err:
                reason = f"{type(err).__name__}: {self._redact(str(err)) or 'connection failed'}"
            else:
                status = resp.status_code
                if status == 200:
                    try:
                        data = resp.json()
                    except ValueError:  # a reply cut short (e.g. the server died mid-send)
                        data = None
                        reason = "HTTP 200 with a body that is not JSON: " + self._body_snippet(resp)
                    if data is not None:
                        try:
                            _check_shape(data)
                        except _IncompleteReply as err:
                            reason = self._redact(str(err))
                        except _BadShape as err:
                            raise OpenAIBackendError(
                                f"openai backend: {what}: unexpected reply from {self.url} ({self._redact(str(err))}): "
                                f"{self._body_snippet(resp)}"
                            ) from None
                        else:
                            self.stats.calls += 1
                            return data
                elif status in _RETRY_STATUS or status >= 500:
                    reason = f"HTTP {status}: {self._body_snippet(resp)}"
                    retry_after = _retry_after_s(resp.headers.get("retry-after"))
                else:
                    raise OpenAIBackendError(
                        f"openai backend: {what} failed with HTTP {status} from {self.url} "
                        f"(not retried: the request itself was refused): {self._body_snippet(resp)}"
                    )
            if attempt == self.max_retries:
                raise OpenAIBackendError(
                    f"openai backend: {what} failed after {attempt + 1} attempts over "
                    f"{time.monotonic() - t0:.1f}s (max_retries={self.max_retries}) at {self.url}; "
                    f"last error: {reason}",
                    transient=True,
                )
            if retry_after is not None:
                if retry_after > MAX_RETRY_AFTER_S:
                    raise OpenAIBackendError(
                        f"openai backend: {what}: server asked to retry after {retry_after:.0f}s, more "
                        f"than the {MAX_RETRY_AFTER_S:.0f}s this backend waits; last error: {reason}",
                        transient=True,
                    )
                wait = retry_after
            else:
                step = min(MAX_BACKOFF_S, self.retry_backoff_s * 2**attempt)
                wait = step / 2 + random.uniform(0, step / 2)
            log.warning(
                "openai: %s attempt %d/%d failed (%s); retrying in %.2fs",
                what, attempt + 1, self.max_retries + 1, reason, wait,
            )
            try:
                await asyncio.wait_for(stop.wait(), timeout=wait)
                return None  # another call failed for good while this one waited
            except asyncio.TimeoutError:
                pass
        raise AssertionError("unreachable")

    def _parse(self, data: dict, chunk: list[SampleRequest], params: SamplingParams) -> list[Completion]:
        """Choices (in index order, at most len(chunk)) as Completions with usage and finish reason."""
        choices = sorted(data["choices"], key=lambda c: c.get("index", 0))[: len(chunk)]
        usage = data.get("usage") or {}
        prompt_tokens = int(usage.get("prompt_tokens") or 0)
        completion_total = int(usage.get("completion_tokens") or 0)
        texts = [(c.get("message") or {}).get("content") or "" for c in choices]
        reasons = [c.get("finish_reason") for c in choices]
        if len(choices) == 1:
            per_choice = [completion_total]
        else:
            per_choice = _split_tokens(completion_total, texts, reasons, params.max_new_tokens)
        out = []
        for req, choice, text, raw, ntok in zip(chunk, choices, texts, reasons, per_choice):
            extra: dict[str, Any] = {"seed_sent": chunk[0].seed, "n": len(chunk)}
            if raw not in ("stop", "length"):
                extra["finish_reason_raw"] = raw
            if len(choices) > 1:
                extra["usage_estimated"] = True
            if not usage:
                extra["usage_missing"] = True
            reasoning = (choice.get("message") or {}).get("reasoning_content")
            if isinstance(reasoning, str) and reasoning:
                extra["reasoning"] = reasoning  # some servers put the rationale here
            out.append(
                Completion(
                    key=req.key,
                    sample_index=req.sample_index,
                    text=text,
                    prompt_tokens=prompt_tokens,
                    completion_tokens=ntok,
                    finish_reason=_FINISH.get(raw, "stop"),
                    extra=extra,
                )
            )
        return out

    def close(self) -> None:
        for j in self._journals.values():
            j.close()
        self._journals.clear()


class _BadShape(ValueError):
    pass


class _IncompleteReply(Exception):
    pass


def _check_shape(data: Any) -> None:
    """Raise _BadShape for a reply that is not a chat completion, _IncompleteReply for a cut one."""
    if not isinstance(data, dict) or not isinstance(data.get("choices"), list) or not data["choices"]:
        raise _BadShape("no choices")
    for c in data["choices"]:
        if not isinstance(c, dict) or not isinstance(c.get("message"), dict):
            raise _BadShape("a choice without a message")
        content = c["message"].get("content")
        if content is not None and not isinstance(content, str):
            raise _BadShape("message content is not a string")
        if c.get("finish_reason") in _INCOMPLETE:
            raise _IncompleteReply(f"incomplete choice (finish_reason={c.get('finish_reason')!r})")


def _split_tokens(total: int, texts: list[str], reasons: list[Any], max_new: int) -> list[int]:
    """Estimate per-choice completion tokens from a call's total (servers report only the sum)."""
    out = [0] * len(texts)
    free = []
    left = total
    for i, r in enumerate(reasons):
        if _FINISH.get(r) == "length":
            out[i] = min(max_new, max(left, 0))
            left -= out[i]
        else:
            free.append(i)
    chars = sum(len(texts[i]) for i in free)
    given = 0
    for j, i in enumerate(free):
        if j == len(free) - 1:
            out[i] = max(left - given, 0)
        else:
            share = left * len(texts[i]) // chars if chars else left // len(free)
            out[i] = max(share, 0)
            given += out[i]
    return out


def _run_coroutine(coro: Any) -> Any:
    """asyncio.run, also from code that already runs an event loop (it gets a thread of its own)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()

