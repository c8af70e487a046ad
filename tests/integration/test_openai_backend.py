"""The openai backend against a real local HTTP server that speaks /v1/chat/completions.

The server (stdlib ThreadingHTTPServer in a thread, 127.0.0.1, random port) answers
deterministically: a choice's text is derived from the messages, the seed and the choice index, so
every test can say exactly which text each sample must get. Faults are injected deterministically
per (request body, attempt number), so a failing run fails the same way every time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import quote

import pytest

from stillhouse.tasks.backends.base import SampleRequest, SamplingParams, derive_seed
from stillhouse.tasks.config import ModelConfig
from stillhouse.tasks.backends.openai import OpenAIBackend, OpenAIBackendError, _retry_after_s
from stillhouse.tasks.backends.open import BACKENDS

pytestmark = pytest.mark.integration

MODEL = "teacher-served-name"
SECRET = "sk-test-Zq81-not-a-real-key-7f3c"
KEY_ENV = "STILLHOUSE_TEST_OPENAI_KEY"


def _h(*parts) -> int:
    return int.from_bytes(hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).digest()[:8], "big")


def expected_text(messages, seed: int, choice: int, max_tokens: int) -> tuple[str, str]:
    """What the fake server writes for one choice: (text, finish_reason). Word count varies."""
    h = _h(messages, seed, choice)
    words = [f"w{(h >> (4 * k)) % 97}" for k in range(3 + h % 6)]
    if len(words) > max_tokens:
        return " ".join(words[:max_tokens]), "length"
    return " ".join(words), "stop"


class FakeOpenAI:
    """A deterministic OpenAI-compatible chat server with switchable faults.

    faults: ~20% of first and second attempts of a body get a 500 or a reply slower than the
        client timeout; later attempts always succeed (so a bounded retry count suffices).
    ignore_n: always one choice, whatever `n` asks.
    down_after: serve this many successful calls, then 503 for everything.
    retry_after: 429 with this Retry-After value on the first attempt of every body.
    api_key: required Bearer token; a wrong one gets a 401 that echoes it (as some APIs do).
    """

    def __init__(self, *, faults=False, ignore_n=False, down_after=None, retry_after=None,
                 api_key=None, slow_s=3.0, hold_s=0.0):
        self.faults, self.ignore_n, self.down_after = faults, ignore_n, down_after
        self.retry_after, self.api_key, self.slow_s, self.hold_s = retry_after, api_key, slow_s, hold_s
        self.lock = threading.Lock()
        self.log: list[dict] = []  # one entry per request received
        self.attempts: dict[str, int] = {}
        self.successes = 0
        self.inflight = self.max_inflight = 0
        self.injected = {"500": 0, "slow": 0}
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output clean
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with fake.lock:
                    fake.inflight += 1
                    fake.max_inflight = max(fake.max_inflight, fake.inflight)
                try:
                    status, payload, headers, delay = fake.answer(self.path, body, self.headers)
                    if delay:
                        time.sleep(delay)
                    data = json.dumps(payload).encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout); that is the point of a slow reply
                finally:
                    with fake.lock:
                        fake.inflight -= 1

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def answer(self, path, raw: bytes, headers):
        req = json.loads(raw)
        digest = hashlib.sha256(raw).hexdigest()
        with self.lock:
            attempt = self.attempts.get(digest, 0)
            self.attempts[digest] = attempt + 1
            entry = {"body": req, "auth": headers.get("Authorization"), "attempt": attempt,
                     "t": time.monotonic()}
            self.log.append(entry)
        if self.hold_s:
            time.sleep(self.hold_s)
        if path != "/v1/chat/completions":
            return 404, {"error": {"message": f"no route {path}"}}, {}, 0
        if self.api_key is not None and headers.get("Authorization") != f"Bearer {self.api_key}":
            sent = (headers.get("Authorization") or "").removeprefix("Bearer ")
            return 401, {"error": {"message": f"Incorrect API key provided: {sent}"}}, {}, 0
        if any("poison" in m["content"] for m in req["messages"]):
            msg = "This request is malformed: " + "x" * 3000
            return 400, {"error": {"message": msg, "type": "invalid_request_error"}}, {}, 0
        if self.retry_after is not None and attempt == 0:
            return 429, {"error": {"message": "rate limited"}}, {"Retry-After": self.retry_after}, 0
        if self.faults and attempt < 2:
            roll = _h(digest, attempt) % 100
            if roll < 10:
                with self.lock:
                    self.injected["500"] += 1
                return 500, {"error": {"message": "internal error"}}, {}, 0
            if roll < 20:
                with self.lock:
                    self.injected["slow"] += 1
                delay = self.slow_s  # longer than the client's timeout: it gives up and retries
            else:
                delay = 0
        else:
            delay = 0
        with self.lock:
            if self.down_after is not None and self.successes >= self.down_after:
                return 503, {"error": {"message": "server shutting down"}}, {}, 0
            self.successes += 1
            entry["ok"] = True
        n = 1 if self.ignore_n else int(req.get("n", 1))
        choices, total = [], 0
        for i in range(n):
            text, reason = expected_text(req["messages"], req["seed"], i, req["max_tokens"])
            total += len(text.split())
            choices.append({"index": i, "message": {"role": "assistant", "content": text},
                            "finish_reason": reason})
        prompt = sum(len(m["content"].split()) for m in req["messages"])
        usage = {"prompt_tokens": prompt, "completion_tokens": total, "total_tokens": prompt + total}
        return 200, {"id": "x", "object": "chat.completion", "model": req["model"],
                     "choices": choices, "usage": usage}, {}, delay

    def ok_seeds(self) -> list[int]:
        return [e["body"]["seed"] for e in self.log if e.get("ok")]

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def make_requests(problems: int, samples: int, base_seed: int = 0) -> list[SampleRequest]:
    out = []
    for i in range(problems):
        msgs = ({"role": "system", "content": "Solve it."},
                {"role": "user", "content": f"What is {i} plus {2 * i}?"})
        for j in range(samples):
            out.append(SampleRequest(f"p{i}", j, msgs, derive_seed(base_seed, f"p{i}", j)))
    return out


PARAMS = SamplingParams(temperature=0.7, top_p=0.95, max_new_tokens=6)


def backend(url, tmp_path, **kw) -> OpenAIBackend:
    opts = dict(journal_dir=tmp_path / "journal", max_concurrency=4, request_timeout_s=5.0,
                max_retries=4, retry_backoff_s=0.01)
    opts.update(kw)
    return OpenAIBackend(url, MODEL, **opts)


def rows(completions):
    return [(c.key, c.sample_index, c.text, c.prompt_tokens, c.completion_tokens, c.finish_reason)
            for c in completions]


def journal_lines(tmp_path) -> list[bytes]:
    return [ln for p in sorted((tmp_path / "journal").rglob("*.jsonl")) for ln in p.read_bytes().splitlines()]


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# --------------------------------------------------------------------------- tests


def test_faulty_server_gives_every_sample_once_and_equals_fault_free_run(tmp_path):
    reqs = make_requests(10, 4)
    with FakeOpenAI() as clean:
        b = backend(clean.base_url, tmp_path / "a")
        reference = b.sample(reqs, PARAMS)
        b.close()
    with FakeOpenAI(faults=True, slow_s=3.0) as faulty:
        b = backend(faulty.base_url, tmp_path / "b", request_timeout_s=1.0)
        seen = []
        got = b.sample(reqs, PARAMS, progress=lambda d, t: seen.append((d, t)))
        b.close()
    # The faults really happened (both kinds), and were retried.
    assert faulty.injected["500"] > 0 and faulty.injected["slow"] > 0
    assert b.stats.attempts > len(reqs)
    # Every sample exactly once, in request order, each with the text its own seed gives.
    assert [(c.key, c.sample_index) for c in got] == [(r.key, r.sample_index) for r in reqs]
    for r, c in zip(reqs, got):
        assert c.text == expected_text(list(r.messages), r.seed, 0, PARAMS.max_new_tokens)[0]
    assert rows(got) == rows(reference)
    assert seen[-1] == (len(reqs), len(reqs))
    # One journal record per sample even though some replies were received twice server-side.
    assert len(journal_lines(tmp_path / "b")) == len(reqs)


def test_concurrency_is_bounded(tmp_path):
    reqs = make_requests(6, 3)
    with FakeOpenAI(hold_s=0.05) as srv:
        b = backend(srv.base_url, tmp_path, max_concurrency=3)
        b.sample(reqs, PARAMS)
    assert len(srv.log) == len(reqs)
    assert srv.max_inflight <= 3


def test_429_retry_after_is_honoured(tmp_path):
    reqs = make_requests(2, 1)
    with FakeOpenAI(retry_after="1") as srv:
        # backoff alone would retry after ~0.01 s; the server asked for 1 s
        got = backend(srv.base_url, tmp_path, retry_backoff_s=0.01).sample(reqs, PARAMS)
    assert len(got) == 2
    for seed in {e["body"]["seed"] for e in srv.log}:
        times = [e["t"] for e in srv.log if e["body"]["seed"] == seed]
        assert len(times) == 2
        assert times[1] - times[0] >= 0.95


def test_retry_after_longer_than_the_cap_fails_at_once(tmp_path):
    with FakeOpenAI(retry_after="100000") as srv:
        with pytest.raises(OpenAIBackendError, match="retry after 100000s"):
            backend(srv.base_url, tmp_path).sample(make_requests(1, 1), PARAMS)
    assert len(srv.log) == 1


def test_retry_after_header_forms():
    assert _retry_after_s("3") == 3.0
    assert _retry_after_s(None) is None and _retry_after_s("soon") is None
    http_date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 60))
    assert 50 < _retry_after_s(http_date) <= 61


def test_non_retryable_400_fails_naming_the_key_and_body(tmp_path):
    reqs = make_requests(3, 1)
    poison = SampleRequest("p-poison", 0, ({"role": "user", "content": "poison pill"},), 7)
    with FakeOpenAI() as srv:
        with pytest.raises(OpenAIBackendError) as err:
            backend(srv.base_url, tmp_path, max_concurrency=1).sample([reqs[0], poison, *reqs[1:]], PARAMS)
    msg = str(err.value)
    assert "p-poison" in msg and "HTTP 400" in msg and "This request is malformed" in msg
    assert "more chars" in msg and len(msg) < 1500  # the 3000-char body is truncated
    assert sum(1 for e in srv.log if e["body"]["seed"] == 7) == 1  # never retried


def test_server_down_retries_are_bounded_then_fail_clearly(tmp_path):
    url = f"http://127.0.0.1:{closed_port()}/v1"
    b = backend(url, tmp_path, max_retries=2, retry_backoff_s=0.01, max_concurrency=1)
    with pytest.raises(OpenAIBackendError) as err:
        b.sample(make_requests(2, 2), PARAMS)
    msg = str(err.value)
    assert "after 3 attempts" in msg and "key='p0' sample_index=0" in msg and "ConnectError" in msg
    assert "0 of 4 new completions" in msg
    # After the first call fails for good, the calls queued behind it never start.
    assert b.stats.attempts == 3
    assert journal_lines(tmp_path) == []


def test_received_responses_survive_a_failure_and_rerun_sends_only_the_rest(tmp_path):
    reqs = make_requests(5, 4)
    with FakeOpenAI() as clean:
        reference = backend(clean.base_url, tmp_path / "ref").sample(reqs, PARAMS)
    with FakeOpenAI(down_after=7) as srv:
        first = backend(srv.base_url, tmp_path, max_retries=2)
        with pytest.raises(OpenAIBackendError, match="7 of 20 new completions were received"):
            first.sample(reqs, PARAMS)
        first.close()
        assert len(journal_lines(tmp_path)) == 7
        served_before = set(srv.ok_seeds())
        # A kill mid-write leaves a torn last line; the rerun must read past it.
        path = next((tmp_path / "journal").rglob("*.jsonl"))
        with open(path, "ab") as f:
            f.write(b'{"id": "torn", "key": "p0", "te')
        srv.down_after = None  # the server is back
        n_before = len(srv.log)
        second = backend(srv.base_url, tmp_path)
        got = second.sample(reqs, PARAMS)
        served_after = srv.ok_seeds()[len(served_before):]
        sent_in_rerun = srv.log[n_before:]
    assert len(sent_in_rerun) == 13 and len(served_after) == 13
    assert served_before.isdisjoint(served_after)
    assert served_before | set(served_after) == {r.seed for r in reqs}
    assert second.stats.reused == 7 and second.stats.generated == 13
    assert rows(got) == rows(reference)
    # A third run costs nothing at all: the server is gone, and nothing is asked of it.
    third = backend(srv.base_url, tmp_path)
    assert rows(third.sample(reqs, PARAMS)) == rows(reference)
    assert third.stats.attempts == 0 and third.stats.reused == 20


def test_n_groups_samples_into_one_call(tmp_path):
    reqs = make_requests(5, 4)
    with FakeOpenAI() as srv:
        got = backend(srv.base_url, tmp_path, use_n=True).sample(reqs, PARAMS)
    assert len(srv.log) == 5 and all(e["body"]["n"] == 4 for e in srv.log)
    for i in range(5):
        group = got[4 * i : 4 * i + 4]
        first_seed = reqs[4 * i].seed  # the call carries the first sample's seed
        for j, c in enumerate(group):
            assert (c.key, c.sample_index) == (f"p{i}", j)
            want = expected_text(list(reqs[4 * i].messages), first_seed, j, PARAMS.max_new_tokens)[0]
            assert c.text == want
            assert c.extra["usage_estimated"]
        # Per-sample completion tokens are estimated, but they add up to what the server billed.
        billed = sum(len(c.text.split()) for c in group)
        assert sum(c.completion_tokens for c in group) == billed


def test_server_that_ignores_n_gets_one_request_per_sample(tmp_path):
    reqs = make_requests(4, 3)
    with FakeOpenAI() as clean:
        per_seed = backend(clean.base_url, tmp_path / "ref").sample(reqs, PARAMS)
    with FakeOpenAI(ignore_n=True) as srv:
        b = backend(srv.base_url, tmp_path / "n", use_n=True, max_concurrency=1)
        got = b.sample(reqs, PARAMS)
    # Each reply's single choice is used, and the rest are sent with their own seeds: nothing is
    # lost or asked twice, and the result is the per-seed one.
    assert len(srv.log) == len(reqs)
    assert sorted(e["body"]["seed"] for e in srv.log) == sorted(r.seed for r in reqs)
    assert srv.log[0]["body"]["n"] == 3 and all(e["body"]["n"] == 1 for e in srv.log[1:])
    assert rows(got) == rows(per_seed)


def test_api_key_sent_as_bearer_and_never_stored(tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    reqs = make_requests(3, 2)
    with FakeOpenAI(api_key=SECRET) as srv:
        b = backend(srv.base_url, tmp_path, api_key_env=KEY_ENV)
        got = b.sample(reqs, PARAMS)
        b.close()
    assert len(got) == 6
    assert {e["auth"] for e in srv.log} == {f"Bearer {SECRET}"}
    stored = b"".join(p.read_bytes() for p in (tmp_path / "journal").rglob("*") if p.is_file())
    assert stored and SECRET.encode() not in stored
    assert SECRET not in repr(b)


def test_api_key_redacted_from_errors_and_logs(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(KEY_ENV, SECRET)
    caplog.set_level(logging.DEBUG)
    with FakeOpenAI(api_key="sk-the-right-one") as srv:
        with pytest.raises(OpenAIBackendError) as err:
            backend(srv.base_url, tmp_path, api_key_env=KEY_ENV).sample(make_requests(1, 1), PARAMS)
    # The server echoed the wrong key in its 401 body; the error quotes the body, redacted.
    assert "HTTP 401" in str(err.value) and "Incorrect API key provided: ***" in str(err.value)
    assert SECRET not in str(err.value) and SECRET not in caplog.text
    assert len(srv.log) == 1  # 401 is not retried


class EchoingOpenAI(FakeOpenAI):
    """Answers each body's first attempt with a 503 that echoes the key in other shapes."""

    echoed = 0

    def answer(self, path, raw, headers):
        digest = hashlib.sha256(raw).hexdigest()
        if self.attempts.get(digest, 0) == 0:
            with self.lock:
                self.attempts[digest] = 1
                self.echoed += 1
            sent = (headers.get("Authorization") or "").removeprefix("Bearer ")
            msg = f"overloaded; key {sent.upper()} ({quote(sent, safe='')}) retry later"
            return 503, {"error": {"message": msg}}, {}, 0
        return super().answer(path, raw, headers)


def _shapes(secret: str) -> list[str]:
    return [secret.lower(), quote(secret, safe="").lower()]


def test_api_key_from_a_file_with_a_trailing_newline_works_and_never_leaks(tmp_path, monkeypatch, caplog):
    # Keys mounted from files (Kubernetes secrets, `$(cat key)`) end in a newline.
    monkeypatch.setenv(KEY_ENV, SECRET + "\n")
    caplog.set_level(logging.DEBUG)
    with EchoingOpenAI(api_key=SECRET) as srv:
        b = backend(srv.base_url, tmp_path, api_key_env=KEY_ENV)
        got = b.sample(make_requests(2, 2), PARAMS)
        b.close()
    assert len(got) == 4
    assert {e["auth"] for e in srv.log} == {f"Bearer {SECRET}"}  # sent without the newline
    assert "overloaded; key *** (***)" in caplog.text  # the echoed key, in upper case and encoded
    logged = caplog.text.lower()
    assert not [s for s in _shapes(SECRET) if s in logged]
    # A server that refuses it: the error and the logs quote no shape of it either.
    caplog.clear()
    with FakeOpenAI(api_key="sk-the-right-one") as srv:
        with pytest.raises(OpenAIBackendError) as err:
            backend(srv.base_url, tmp_path, api_key_env=KEY_ENV).sample(make_requests(1, 1), PARAMS)
    assert "HTTP 401" in str(err.value)
    text = (str(err.value) + caplog.text).lower()
    assert not [s for s in _shapes(SECRET) if s in text]


def test_api_key_with_whitespace_inside_is_refused_naming_only_the_variable(tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-abc def")
    with pytest.raises(ValueError, match=KEY_ENV) as err:
        backend("http://127.0.0.1:1/v1", tmp_path, api_key_env=KEY_ENV)
    assert "sk-abc" not in str(err.value)


def test_missing_api_key_env_names_the_variable(tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(ValueError, match=KEY_ENV):
        backend("http://127.0.0.1:1/v1", tmp_path, api_key_env=KEY_ENV)


def test_usage_and_finish_reason_recorded(tmp_path):
    reqs = make_requests(6, 2)
    params = SamplingParams(temperature=0.7, top_p=1.0, max_new_tokens=5)
    with FakeOpenAI() as srv:
        b = backend(srv.base_url, tmp_path)
        got = b.sample(reqs, params)
    reasons = set()
    for r, c in zip(reqs, got):
        text, reason = expected_text(list(r.messages), r.seed, 0, 5)
        assert c.prompt_tokens == sum(len(m["content"].split()) for m in r.messages)
        assert c.completion_tokens == len(text.split())
        assert c.finish_reason == reason
        reasons.add(reason)
    assert reasons == {"stop", "length"}  # both mappings exercised
    assert b.stats.completion_tokens == sum(c.completion_tokens for c in got)
    # Usage survives the journal: a rerun (server gone) returns the same numbers without a call.
    again = backend(srv.base_url, tmp_path)
    assert rows(again.sample(reqs, params)) == rows(got) and again.stats.attempts == 0


def test_registered_in_backends(tmp_path):
    reqs = make_requests(2, 2)
    with FakeOpenAI() as srv:
        cfg = ModelConfig(name_or_path=MODEL, backend="openai", base_url=srv.base_url, max_concurrency=2,
                          max_retries=1, retry_backoff_s=0.01)
        b = BACKENDS["openai"](cfg, 4, None, tmp_path / "work")
        got = b.sample(reqs, PARAMS)
        b.close()
    assert {e["body"]["model"] for e in srv.log} == {MODEL}
    # The journal sits in the work folder the flow gives (inside the run's cache).
    assert len(got) == 4 and list((tmp_path / "work" / "journal").rglob("*.jsonl"))
    with pytest.raises(ValueError, match="LoRA adapter"):
        BACKENDS["openai"](cfg, 4, "/some/adapter", tmp_path / "work")
