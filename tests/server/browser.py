"""A headless Chromium driven over the DevTools protocol, for the browser tests.

The protocol runs over a pipe (`--remote-debugging-pipe`: commands in on fd 3, replies out on fd 4,
each message JSON ended by a NUL byte), so no WebSocket client and no debugging port are needed.
Chromium runs as root here, which needs --no-sandbox; it gets a profile folder of its own.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path


def chromium_binary() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


class Browser:
    def __init__(self, binary: str, profile: Path, width: int = 1400, height: int = 1000):
        cmd_read, self._cmd_write = os.pipe()
        self._reply_read, reply_write = os.pipe()

        def fds() -> None:  # in the child: the protocol's fixed descriptors, inheritable
            # Via copies above 10: either pipe end may itself be fd 3 or 4 (then a plain dup2
            # would be a no-op that keeps close-on-exec, or clobber the other end).
            high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (cmd_read, reply_write)]
            os.dup2(high[0], 3)
            os.dup2(high[1], 4)

        self.proc = subprocess.Popen(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--no-first-run", "--remote-debugging-pipe", f"--user-data-dir={profile}",
             f"--window-size={width},{height}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=fds, close_fds=False, start_new_session=True,
        )
        os.close(cmd_read)
        os.close(reply_write)
        self._buf = b""
        self._id = 0
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self._session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.call("Page.enable", session=True)
        self.call("Emulation.setDeviceMetricsOverride", session=True, width=width, height=height,
                  deviceScaleFactor=1, mobile=False)

    def call(self, method: str, session: bool = False, timeout: float = 60, **params):
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params}
        if session:
            msg["sessionId"] = self._session
        os.write(self._cmd_write, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self._buf:
                raw, self._buf = self._buf.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self._id:
                    if "error" in reply:
                        raise RuntimeError(f"{method}: {reply['error']}")
                    return reply.get("result", {})
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                raise TimeoutError(f"no reply to {method} from Chromium (exit code {self.proc.poll()})")
            ready, _, _ = select.select([self._reply_read], [], [], left)
            if ready:
                chunk = os.read(self._reply_read, 1 << 20)
                if not chunk:
                    raise RuntimeError("Chromium closed the protocol pipe")
                self._buf += chunk

    def evaluate(self, expression: str):
        res = self.call("Runtime.evaluate", session=True, expression=expression, returnByValue=True)
        return res.get("result", {}).get("value")

    def open(self, url: str) -> None:
        self.call("Page.navigate", session=True, url=url)

    def text(self) -> str:
        """The page's rendered text (what a user reads; no markup, no hidden script text)."""
        return self.evaluate("document.body ? document.body.innerText : ''") or ""

    def wait_for(self, check: Callable[[str], bool], what: str, timeout: float = 60) -> str:
        """The page's text once `check(text)` holds (pages render in pieces); fails naming `what`
        with the text the page has otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.text()
            if check(text):
                return text
            if time.monotonic() > deadline:
                raise AssertionError(f"page lacks {what} after {timeout} s; its text:\n{text[:3000]}")
            time.sleep(0.5)

    def wait_for_text(self, needles: list[str], timeout: float = 60) -> str:
        return self.wait_for(lambda text: all(n in text for n in needles), repr(needles), timeout)

    def click_text(self, label: str) -> bool:
        """Clicks the first button, tab or link whose text is exactly `label`."""
        return bool(self.evaluate(
            "(() => { for (const el of document.querySelectorAll('button, a, [role=tab], li, span')) {"
            f"  if (el.innerText && el.innerText.trim() === {json.dumps(label)}) {{ el.click(); return true; }} }}"
            " return false; })()"))

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", session=True, format="png", captureBeyondViewport=True)["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        for fd in (self._cmd_write, self._reply_read):
            try:
                os.close(fd)
            except OSError:
                pass
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue
