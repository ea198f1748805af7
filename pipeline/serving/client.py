"""Client side of the serving target: find, call and wait for a `tollgate serve` process over HTTP.

Promotion, rollback and registration's infra validation use it; it imports no web framework.
"""

from __future__ import annotations

import json
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from pipeline.serving import state


class Unreachable(RuntimeError):
    """A server is registered for this checkout and alive, but did not answer."""


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


def running_server(root: Path, timeout: float) -> Server | None:
    """The champion-following `tollgate serve` of this checkout, or None when none runs. A registered,
    living server that does not answer within `timeout` raises Unreachable: a busy server is not absent."""
    found = state.read(root)
    if found is None:
        return None
    if not found.alive():
        state.withdraw(root, found.pid)  # left by a killed process
        return None
    server = Server(found.url, found.token)
    try:
        server.call("GET", "/v2/health/live", timeout=timeout)
    except (OSError, ValueError) as err:
        raise Unreachable(
            f"tollgate serve (pid {found.pid}) at {found.url} did not answer within {timeout:g} s: {err}"
        ) from None
    return server


def free_port(host: str = "127.0.0.1") -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
