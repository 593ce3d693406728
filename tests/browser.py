"""Open a local HTML file in headless Chromium and report what a user would see (test helper).

Chromium is driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``: commands
on fd 3, replies on fd 4, NUL-separated JSON), so no WebDriver, websocket library or free TCP
port is needed — only the Debian ``chromium`` package.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Flags known to work as root in containers; a fresh profile keeps runs independent.
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--window-size=1280,900",
    "--remote-debugging-pipe",
)
CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    """Path of a Chromium/Chrome executable on PATH, or None."""
    env = os.environ.get("CNNCAM_CHROMIUM")
    if env:
        return env
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


@dataclass
class PageReport:
    """What the page did: images (src, naturalWidth), console errors, dialogs, visible text."""

    images: list[tuple[str, int]]
    console_errors: list[str]
    dialogs: list[str]
    inner_text: str
    screenshot: Path
    events: list[dict[str, Any]] = field(default_factory=list)


class _Pipe:
    """One DevTools connection over the two pipes; collects every event it reads."""

    def __init__(self, write_fd: int, read_fd: int, timeout: float) -> None:
        self.write_fd, self.read_fd, self.timeout = write_fd, read_fd, timeout
        self.buffer = b""
        self.next_id = 0
        self.events: list[dict[str, Any]] = []

    def send(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> Any:
        self.next_id += 1
        msg: dict[str, Any] = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self.write_fd, json.dumps(msg).encode() + b"\0")
        while True:
            reply = self._read()
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method} failed: {reply['error']}")
                return reply.get("result", {})
            self._event(reply, session)

    def wait_event(self, method: str, session: str | None = None) -> dict[str, Any]:
        for event in self.events:
            if event.get("method") == method:
                return event
        while True:
            event = self._read()
            self._event(event, session)
            if event.get("method") == method:
                return event

    def _event(self, event: dict[str, Any], session: str | None) -> None:
        if "method" not in event:
            return
        self.events.append(event)
        if event["method"] == "Page.javascriptDialogOpening" and session:
            # An open dialog blocks the page; dismiss it (the test fails on it anyway).
            self.next_id += 1
            msg = {
                "id": self.next_id,
                "method": "Page.handleJavaScriptDialog",
                "params": {"accept": False},
                "sessionId": session,
            }
            os.write(self.write_fd, json.dumps(msg).encode() + b"\0")

    def _read(self) -> dict[str, Any]:
        deadline = time.monotonic() + self.timeout
        while b"\0" not in self.buffer:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self.read_fd], [], [], max(left, 0))
            if not ready:
                raise TimeoutError(f"no DevTools message from Chromium within {self.timeout} s")
            chunk = os.read(self.read_fd, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed the DevTools pipe (did it crash?)")
            self.buffer += chunk
        raw, _, self.buffer = self.buffer.partition(b"\0")
        return dict(json.loads(raw))


def _errors(events: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
    errors, dialogs = [], []
    for e in events:
        method, p = e["method"], e.get("params", {})
        if method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            errors.append("console: " + " ".join(str(a.get("value", a)) for a in p.get("args", [])))
        elif method == "Runtime.exceptionThrown":
            errors.append("exception: " + json.dumps(p.get("exceptionDetails", {}))[:500])
        elif method == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
            entry = p["entry"]
            errors.append(f"log: {entry.get('text')} {entry.get('url', '')}")
        elif method == "Page.javascriptDialogOpening":
            dialogs.append(f"{p.get('type')}: {p.get('message')}")
    return errors, dialogs


def open_page(html: Path, screenshot: Path, timeout: float = 60.0, settle_s: float = 0.5) -> PageReport:
    """Load ``html`` (a local file), wait for every image, screenshot the full page to ``screenshot``."""
    exe = find_chromium()
    if exe is None:
        raise FileNotFoundError("no chromium executable found (apt-get install chromium)")
    cmd_r, cmd_w = os.pipe()  # we write commands, Chromium reads them on fd 3
    res_r, res_w = os.pipe()  # Chromium writes replies on fd 4
    # The child's ends move to fds >= 10, so placing them on 3 and 4 can never clobber one with
    # the other.  A tiny Python trampoline does the dup2 + exec: no preexec_fn (unsafe once torch
    # has started threads), and dash cannot redirect fds above 9.
    child_r, child_w = fcntl.fcntl(cmd_r, fcntl.F_DUPFD, 10), fcntl.fcntl(res_w, fcntl.F_DUPFD, 10)
    for fd in (cmd_r, res_w):
        os.close(fd)
    with tempfile.TemporaryDirectory(prefix="cnncam-chromium-") as profile:
        args = [exe, *FLAGS, f"--user-data-dir={profile}", "about:blank"]
        trampoline = (
            f"import os, sys; os.dup2({child_r}, 3); os.dup2({child_w}, 4); "
            f"os.close({child_r}); os.close({child_w}); os.execv(sys.argv[1], sys.argv[1:])"
        )
        proc = subprocess.Popen(
            [sys.executable, "-c", trampoline, *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            pass_fds=(child_r, child_w),
        )
        os.close(child_r)
        os.close(child_w)
        pipe = _Pipe(cmd_w, res_r, timeout)
        try:
            return _drive(pipe, Path(html), Path(screenshot), settle_s, timeout)
        finally:
            try:
                pipe.send("Browser.close")
            except (OSError, RuntimeError, TimeoutError):
                pass
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            os.close(cmd_w)
            os.close(res_r)


def _drive(pipe: _Pipe, html: Path, screenshot: Path, settle_s: float, timeout: float) -> PageReport:
    target = pipe.send("Target.createTarget", {"url": "about:blank"})["targetId"]
    session = pipe.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
    for domain in ("Page.enable", "Runtime.enable", "Log.enable"):
        pipe.send(domain, session=session)
    pipe.events.clear()
    pipe.send("Page.navigate", {"url": html.resolve().as_uri()}, session=session)
    pipe.wait_event("Page.loadEventFired", session)

    def evaluate(expr: str) -> Any:
        out = pipe.send("Runtime.evaluate", {"expression": expr, "returnByValue": True}, session=session)
        return out["result"].get("value")

    deadline = time.monotonic() + timeout
    while not evaluate("Array.from(document.images).every(i => i.complete)"):
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    time.sleep(settle_s)  # let late console messages arrive
    evaluate("0")
    images = [
        (str(src), int(width))
        for src, width in json.loads(
            evaluate(
                "JSON.stringify(Array.from(document.images).map(i => [i.getAttribute('src'), "
                "i.naturalWidth]))"
            )
        )
    ]
    text = str(evaluate("document.body.innerText"))
    shot = pipe.send(
        "Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True}, session=session
    )
    screenshot.write_bytes(base64.b64decode(shot["data"]))
    errors, dialogs = _errors(pipe.events)
    return PageReport(images, errors, dialogs, text, screenshot, list(pipe.events))
