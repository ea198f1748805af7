"""Client side of the serving target: find, call and wait for a `tollgate serve` process over HTTP."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from pipeline import paths


@dataclass(frozen=True)
class Server:
    url: str
    token: str = ""

    def call(self, method: str, path: str, body: dict | None = None, timeout: float = 30.0) -> dict:
        req = urllib.request.Request(
            self.url + path,
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {self.token}"},
        )
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())

    def wait_ready(self, timeout: float, alive=lambda: True) -> None:
        """Block until /v2/health/ready answers 200; `alive()` False (the process died) stops early."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and alive():
            try:
                self.call("GET", "/v2/health/ready", timeout=2.0)
                return
            except (OSError, ValueError):
                time.sleep(0.2)
        raise TimeoutError(f"{self.url} was not ready within {timeout:.0f} s" if alive() else "server exited")


def running_server(root: Path) -> Server | None:
    """The champion-following `tollgate serve` of this project, if its state file exists and it answers."""
    try:
        state = json.loads((root / paths.SERVER_STATE).read_text())
        server = Server(state["url"], state["token"])
        server.call("GET", "/v2/health/live", timeout=2.0)
    except (OSError, ValueError, KeyError, urllib.error.URLError):
        return None
    return server
