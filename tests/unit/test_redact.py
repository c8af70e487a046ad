"""Secrets stay out of messages whatever shape they reach them in; bad inputs are refused at once."""

from __future__ import annotations

import base64
from urllib.parse import quote

import pytest
import yaml

from stillhouse.tasks.config import MAX_ROUNDS, ConfigError, load_config, parse_config
from stillhouse.tasks.redact import MASK, Redactor, check_base_url, clean_secret

pytestmark = pytest.mark.unit

KEY = "sk-Live/9f8e+7d6c5b4a3"


@pytest.mark.parametrize("shape", [
    KEY,
    KEY.upper(),
    KEY.lower(),
    repr(KEY + "\n")[1:-1],  # a str repr of the key with the newline a key file left on it
    repr((KEY + "\n").encode())[2:-1],  # httpx: "Illegal header value b'Bearer sk-...\\n'"
    quote(KEY, safe=""),  # URL-encoded (a key put in a URL's user or password part)
    quote(KEY, safe="").lower(),
    base64.b64encode(f"user:{KEY}".encode()).decode(),  # Basic auth of user:key
    base64.b64encode(f"{KEY}:".encode()).decode(),
])
def test_every_shape_of_the_key_is_masked(shape):
    redact = Redactor([KEY + "\n"])
    text = redact(f"server said: {shape} (try again)")
    assert MASK in text
    assert KEY.lower() not in text.lower()
    assert quote(KEY, safe="").lower() not in text.lower()
    # Basic auth: no 4-character base64 group that encodes key bytes survives
    assert text.startswith("server said: ") and text.endswith(" (try again)")


def test_text_without_the_key_is_unchanged():
    redact = Redactor([KEY])
    text = "HTTP 500: internal error at http://127.0.0.1:8000/v1 for request key='abc'"
    assert redact(text) == text
    assert Redactor([])(text) == text and not Redactor([None, ""])


def test_short_secrets_are_masked_verbatim_only():
    redact = Redactor(["ab1"])
    assert redact("AB1 ab1") == f"AB1 {MASK}"


def test_clean_secret_strips_and_refuses_inner_whitespace():
    assert clean_secret(f"  {KEY}\r\n") == KEY
    with pytest.raises(ValueError) as err:
        clean_secret("sk-abc def")
    assert "sk-abc" not in str(err.value)
    with pytest.raises(ValueError):
        clean_secret("sk-abc\x00def")


@pytest.mark.parametrize("url", [
    f"http://user:{KEY}@127.0.0.1:8000/v1",
    f"https://{quote(KEY, safe='')}@api.example.com/v1",
    "http://user@host/v1",
])
def test_credentials_in_base_url_are_refused_without_echoing_them(url):
    with pytest.raises(ValueError) as err:
        check_base_url(url)
    assert KEY not in str(err.value) and "127.0.0.1" not in str(err.value)
    data = yaml.safe_load(open("configs/smoke.yaml"))
    data["teacher"].update(backend="openai", base_url=url, api_key_env="X_KEY")
    with pytest.raises(ConfigError, match="teacher.base_url") as err:
        parse_config(data)
    assert KEY not in str(err.value) and quote(KEY, safe="") not in str(err.value)


def test_rounds_are_bounded():
    with pytest.raises(ConfigError, match="rounds"):
        load_config("configs/smoke.yaml", rounds=100000000000000000000)
    with pytest.raises(ConfigError, match="rounds"):
        load_config("configs/smoke.yaml", rounds=MAX_ROUNDS + 1)
    assert load_config("configs/smoke.yaml", rounds=MAX_ROUNDS).rounds == MAX_ROUNDS


def test_only_failures_that_can_succeed_later_are_retried():
    import httpx

    from stillhouse.flows.distill import retryable
    from stillhouse.storage.catalog import CatalogLockedError, RoundCommittedError
    from stillhouse.tasks.backends.openai import OpenAIBackendError
    from stillhouse.tasks.config import ConfigError
    from stillhouse.tasks.problems import SourceError

    transient = [ConnectionResetError(), TimeoutError(), OSError(5, "I/O error"), CatalogLockedError("x"),
                 httpx.ConnectError("refused"), OpenAIBackendError("server down", transient=True)]
    permanent = [ValueError("bad"), ConfigError("bad config"), SourceError("cannot read"),
                 RoundCommittedError("round 0 is committed"), FileNotFoundError("x.jsonl"),
                 PermissionError("ro"), KeyError("k"), TypeError("t"), RuntimeError("bug"),
                 OpenAIBackendError("HTTP 400 refused"), None]
    assert [retryable(e) for e in transient] == [True] * len(transient)
    assert [retryable(e) for e in permanent] == [False] * len(permanent)
