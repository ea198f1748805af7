"""`.tollgate/server.json`: how promotion finds the champion-following `tollgate serve` of a checkout.

The server publishes it only once it listens, atomically and readable by its owner alone (it holds the
admin and feedback tokens), and withdraws it on every way out, but only if the file is still its own: a
second server that failed to bind must not delete the first one's. A file whose process is gone (killed
with SIGKILL) is stale; one whose process lives but does not answer is a server in trouble, which
promotion must not ignore.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.core import paths
from pipeline.core.files import write_json


@dataclass(frozen=True)
class ServerState:
    url: str
    token: str
    pid: int
    started: float  # the process's start time: a recycled pid is not the same server
    feedback_token: str = ""  # what POST /feedback wants (labellers hold this one, not the admin token)

    def alive(self) -> bool:
        import psutil

        try:
            return psutil.Process(self.pid).create_time() == self.started
        except psutil.Error:
            return False


def this_process(url: str, token: str, feedback_token: str = "") -> ServerState:
    import psutil

    return ServerState(url, token, os.getpid(), psutil.Process().create_time(), feedback_token)


def publish(root: Path, state: ServerState) -> None:
    write_json(root / paths.SERVER_STATE, asdict(state), mode=0o600)


def read(root: Path) -> ServerState | None:
    try:
        return ServerState(**json.loads((root / paths.SERVER_STATE).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def withdraw(root: Path, pid: int) -> None:
    """Remove the state file if it belongs to process `pid`."""
    current = read(root)
    if current is not None and current.pid == pid:
        with contextlib.suppress(FileNotFoundError):
            (root / paths.SERVER_STATE).unlink()
