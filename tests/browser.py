"""Headless Chromium (Debian's ``chromium``) driven over the DevTools protocol: open a page with an
Airflow login cookie, read its text and take a screenshot. No browser download, no extra package."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import tempfile
import time
from itertools import count
from pathlib import Path

import httpx
from websockets.sync.client import connect

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars"]


def chromium_binary() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class Browser:
    def __init__(self, width: int = 1280, height: int = 900) -> None:
        binary = chromium_binary()
        if not binary:
            raise FileNotFoundError("chromium is not installed (Debian package 'chromium')")
        self.profile = tempfile.mkdtemp(prefix="chromium-")
        # Port 0: Chromium picks a free port itself and writes it to DevToolsActivePort in the profile (a port
        # chosen here could be taken by another process before Chromium binds it).
        self.stderr = Path(tempfile.mkstemp(prefix="chromium-stderr-")[1])
        with self.stderr.open("w") as err:
            self.proc = subprocess.Popen(
                [binary, *FLAGS, "--remote-debugging-port=0", f"--user-data-dir={self.profile}",
                 f"--window-size={width},{height}", "about:blank"], stdout=subprocess.DEVNULL, stderr=err)
        active = Path(self.profile) / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while True:
            try:
                self.port = int(active.read_text().split()[0])
                pages = httpx.get(f"http://127.0.0.1:{self.port}/json", timeout=2).json()
                page = next(p for p in pages if p.get("type") == "page")
                break
            except (OSError, IndexError, httpx.HTTPError, StopIteration, ValueError):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    tail = self.stderr.read_text(errors="replace")[-1500:]
                    self.close()
                    raise TimeoutError(f"chromium did not open its DevTools port (exit code {self.proc.returncode}); "
                                       f"its stderr ends with:\n{tail}") from None
                time.sleep(0.2)
        self.ws = connect(page["webSocketDebuggerUrl"], max_size=None)
        self.ids = count(1)
        self.call("Page.enable")
        self.call("Network.enable")

    def call(self, method: str, **params: object) -> dict:
        msg_id = next(self.ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=60))
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def set_cookie(self, url: str, name: str, value: str) -> None:
        self.call("Network.setCookie", url=url, name=name, value=value)

    def open(self, url: str) -> str:
        """Load ``url``, wait for it, return the page's visible text."""
        self.call("Page.navigate", url=url)
        deadline = time.monotonic() + 30
        while self.call("Runtime.evaluate", expression="document.readyState")["result"]["value"] != "complete":
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not finish loading")
            time.sleep(0.1)
        return self.call("Runtime.evaluate", expression="document.body.innerText")["result"].get("value", "")

    def wait_for_text(self, *texts: str, timeout: float = 45) -> str:
        """Poll the page (a React app renders after load) until every text shows; return the page text."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.call("Runtime.evaluate", expression="document.body.innerText")["result"].get("value", "")
            if all(t in text for t in texts):
                return text
            if time.monotonic() > deadline:
                dialog = self.call("Runtime.evaluate", expression=(
                    "[...document.querySelectorAll('[role=dialog]')].map(d => d.innerText).join('|')"))["result"]
                raise TimeoutError(f"page never showed {texts}; dialogs: {dialog.get('value', '')[:1500]}; "
                                   f"page: {text[:400]}")
            time.sleep(0.5)

    def click_text(self, text: str, timeout: float = 30) -> None:
        """Click, as a mouse does, the innermost button, link, label or radio (in the topmost open dialog,
        if there is one) whose text starts with ``text``."""
        script = (
            "(() => { const t = " + json.dumps(text) + "; "
            "const open = [...document.querySelectorAll('[role=dialog]')]"
            ".filter(d => d.innerText.includes(t) && d.getClientRects().length); "
            "const root = open.length ? open[open.length - 1] : document; "
            "const els = [...root.querySelectorAll('button, a, label, [role=radio], [role=tab]')]"
            ".filter(e => e.innerText && e.innerText.trim().startsWith(t) && e.getClientRects().length); "
            "if (!els.length) return null; const el = els[els.length - 1]; el.scrollIntoView({block: 'center'}); "
            "const r = el.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()"
        )
        deadline = time.monotonic() + timeout
        while not (point := self.call("Runtime.evaluate", expression=script, returnByValue=True)["result"]
                   .get("value")):
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing to click labelled {text!r}")
            time.sleep(0.5)
        x, y = point
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    def screenshot(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png",
                                                    captureBeyondViewport=True)["data"]))
        return path

    def close(self) -> None:
        if getattr(self, "ws", None):
            self.ws.close()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        shutil.rmtree(self.profile, ignore_errors=True)
        self.stderr.unlink(missing_ok=True)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
