"""Keeping a secret (an API key) out of every message, log line and file a run writes.

A key reaches text in more shapes than the one it was read in: with the trailing newline a key
file left on it, escaped by `repr()` (httpx's "Illegal header value b'Bearer sk-...\\n'"),
URL-encoded, inside a Basic-auth header (base64 of `user:key`), or echoed back by a server in
another case. `Redactor` knows those shapes of each secret it holds and replaces all of them,
ignoring case.

>>> r = Redactor(["sk-Abc123/xyz\\n"])
>>> r("Illegal header value b'Bearer sk-Abc123/xyz\\\\n'")
"Illegal header value b'Bearer ***'"
>>> r("key SK-ABC123/XYZ and sk-Abc123%2Fxyz")
'key *** and ***'
>>> clean_secret("  sk-1\\n")
'sk-1'
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable
from urllib.parse import quote, quote_plus, urlsplit

MASK = "***"
# Shorter secrets are only replaced verbatim: matching 1-3 characters in any case and encoding
# would blank out ordinary words of a message.
MIN_FUZZY_CHARS = 4


def clean_secret(value: str) -> str:
    """The secret without the whitespace around it (a key file's trailing newline); a secret
    with whitespace or control characters inside is refused, naming no value."""
    value = value.strip()
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError("the secret contains whitespace or control characters inside it")
    return value


def check_base_url(base_url: str) -> str:
    """A server URL without credentials: a user or password in it would travel into the config
    Prefect stores, the journal's scope file and every message that names the URL.

    >>> check_base_url("http://127.0.0.1:8000/v1")
    'http://127.0.0.1:8000/v1'
    """
    # Not only the parsed netloc: an unencoded "/" in a key moves its "@" into the path.
    before_query = base_url.split("?", 1)[0].split("#", 1)[0]
    if "@" in urlsplit(base_url).netloc or "@" in before_query:
        raise ValueError(
            "base_url must not contain a user or password (user:key@host); put the API key in an "
            "environment variable and name it in api_key_env"
        )
    return base_url


def _forms(secret: str) -> set[str]:
    forms = {secret}
    for s in {secret, secret.strip()}:
        forms.add(s)
        forms.add(repr(s)[1:-1])  # escaped as in a str repr
        forms.add(repr(s.encode("utf-8", "backslashreplace"))[2:-1])  # as in a bytes repr
        forms.add(quote(s, safe=""))
        forms.add(quote_plus(s))
        forms.add(s.encode("unicode_escape").decode("ascii"))
    # Basic auth of a key used as a password or user name (`user:key`, `key:`): the base64 of
    # the key alone is not a substring of it, but its aligned 3-byte runs are: mask those.
    raw = secret.strip().encode()
    for offset in range(3):
        chunk = raw[offset:]
        chunk = chunk[: len(chunk) - len(chunk) % 3]
        if len(chunk) >= 6:
            forms.add(base64.b64encode(chunk).decode())
    return {f for f in forms if f}


class Redactor:
    """Callable: text with every known form of every secret replaced by `***`."""

    def __init__(self, secrets: Iterable[str | None] = ()):
        exact: set[str] = set()
        fuzzy: set[str] = set()
        for s in secrets:
            if not s:
                continue
            if len(s.strip()) < MIN_FUZZY_CHARS:
                exact.add(s)
            else:
                fuzzy |= _forms(s)
        self._exact = sorted(exact, key=len, reverse=True)
        # Longest first, so that a form containing another is masked whole.
        alternatives = sorted(fuzzy, key=len, reverse=True)
        self._pattern = (
            re.compile("|".join(re.escape(f) for f in alternatives), re.IGNORECASE) if alternatives else None
        )

    def __bool__(self) -> bool:
        return bool(self._exact or self._pattern)

    def __call__(self, text: str) -> str:
        if self._pattern is not None:
            text = self._pattern.sub(MASK, text)
        for s in self._exact:
            text = text.replace(s, MASK)
        return text
