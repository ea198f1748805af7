"""promote: move @champion to a registered version and make the serving target follow, or roll back.

The alias and the served version must never disagree for long: promotions hold a file lock for the whole
move-verify-or-revert sequence, and a failed verification restores the previous champion on both sides.
"""

from __future__ import annotations

import contextlib
import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import paths, tracking
from pipeline.config import Params


class PromotionError(RuntimeError):
    """The serving target did not verifiably serve the new version; the alias was put back."""


@dataclass(frozen=True)
class Server:
    url: str
    token: str

    def call(self, method: str, path: str, body: dict | None = None, timeout: float = 30.0) -> dict:
        req = urllib.request.Request(
            self.url + path,
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {self.token}"},
        )
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())


def running_server(root: Path) -> Server | None:
    """The `tollgate serve` process of this project, if its state file exists and it answers."""
    state_file = root / paths.SERVER_STATE
    try:
        state = json.loads(state_file.read_text())
        server = Server(state["url"], state["token"])
        server.call("GET", "/v2/health/live", timeout=2.0)
    except (OSError, ValueError, KeyError, urllib.error.URLError):
        return None
    return server


def verify(
    server: Server, name: str, version: str, smoke_x: np.ndarray, expected: np.ndarray, timeout: float
) -> None:
    """Reload the server onto @champion, then check it reports `version` and predicts like evaluation did."""
    served = server.call("POST", "/admin/reload", timeout=timeout)
    if str(served.get("version")) != version:
        raise PromotionError(f"server reloaded version {served.get('version')}, expected {version}")
    meta = server.call("GET", f"/v2/models/{name}", timeout=timeout)
    if str(meta.get("versions", [None])[0]) != version:
        raise PromotionError(f"server reports version {meta.get('versions')}, expected {version}")
    out = server.call("POST", "/invocations", {"inputs": smoke_x.astype(float).tolist()}, timeout=timeout)
    got = np.asarray(out["predictions"]).argmax(1)
    if not np.array_equal(got, expected):
        raise PromotionError(
            f"server predictions differ from evaluation on {int((got != expected).sum())} "
            f"of {len(expected)} smoke images"
        )


def move_champion(
    params: Params, root: Path, version: str, smoke_x: np.ndarray, expected: np.ndarray
) -> dict:
    """Point @champion at `version`, push it to the running server and verify; restore on failure."""
    from filelock import FileLock
    from mlflow import MlflowClient

    name = params.registry.model_name
    client = MlflowClient()
    lock_path = root / ".tollgate" / "promote.lock"
    lock_path.parent.mkdir(exist_ok=True)
    with FileLock(str(lock_path), timeout=params.serve.timeout_s * 4):
        previous = tracking.alias_version(name, tracking.CHAMPION)
        client.set_registered_model_alias(name, tracking.CHAMPION, version)
        server = running_server(root)
        if server is not None:
            try:
                verify(server, name, version, smoke_x, expected, params.serve.timeout_s)
            except (PromotionError, OSError, ValueError, KeyError) as err:
                _restore(client, server, name, previous)
                back = f"v{previous.version}" if previous else "no champion"
                raise PromotionError(
                    f"serving target failed verification of v{version}: {err}; @champion restored to {back}"
                ) from None
        if previous is not None and previous.version != version:
            client.set_registered_model_alias(name, tracking.PREVIOUS, previous.version)
    return {
        "promoted": True,
        "name": name,
        "version": version,
        "previous": previous.version if previous else None,
        "served_by": server.url if server else None,
        "summary": f"promoted {name} v{version} to @champion"
        + (f" (was v{previous.version})" if previous and previous.version != version else "")
        + (
            f"; {server.url} serves it, verified" if server else "; no server running (start: tollgate serve)"
        ),
    }


def _restore(client, server: Server, name: str, previous: tracking.VersionRef | None) -> None:
    if previous is None:
        client.delete_registered_model_alias(name, tracking.CHAMPION)
        return
    client.set_registered_model_alias(name, tracking.CHAMPION, previous.version)
    # The server keeps its last good model when a reload fails; the alias is what matters here.
    with contextlib.suppress(OSError, ValueError):
        server.call("POST", "/admin/reload")


def promote_registered(params: Params, root: Path, registration: dict) -> dict:
    from pipeline.data import load_split
    from pipeline.model import load, predict_proba

    tracking.connect(params, root)
    test = load_split(root / paths.PREPARED_DIR, "test")
    smoke_x = np.asarray(test.x[: params.serve.smoke_images])
    model, _ = load(root / paths.MODEL_DIR)
    expected = predict_proba(model, smoke_x).argmax(1).numpy()
    return move_champion(params, root, registration["version"], smoke_x, expected)
