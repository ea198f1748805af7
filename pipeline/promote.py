"""promote: move @champion to a registered version and make the serving target follow, or roll back.

The alias and the served version must never disagree for long: promotions hold a file lock for the whole
move-verify-or-revert sequence, and a failed verification restores the previous champion on both sides.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np

from pipeline import paths, tracking
from pipeline.config import Params
from pipeline.target import Server, running_server


class PromotionError(RuntimeError):
    """The serving target did not verifiably serve the new version; the alias was put back."""


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


def smoke_check(params: Params, root: Path, model_uri: str) -> tuple[np.ndarray, np.ndarray]:
    """Test images and the classes the given MLflow model predicts for them, loaded the way the server
    loads it: what the serving target must reproduce."""

    from pipeline.data import load_split
    from pipeline.model import predict_proba

    smoke_x = np.asarray(load_split(root / paths.PREPARED_DIR, "test").x[: params.serve.smoke_images])
    model, _ = tracking.load_model(model_uri)
    return smoke_x, predict_proba(model, smoke_x).argmax(1).numpy()


def move_champion(params: Params, root: Path, version: str) -> dict:
    """Point @champion at `version`, push it to the running server and verify; restore on failure.
    Promotion and rollback both come through here."""
    from filelock import FileLock
    from mlflow import MlflowClient

    name = params.registry.model_name
    client = MlflowClient()
    client.get_model_version(name, version)  # fails clearly for a version that does not exist
    lock_path = root / ".tollgate" / "promote.lock"
    lock_path.parent.mkdir(exist_ok=True)
    # Held across alias move, reload and verification, so two promotions cannot interleave and leave the
    # alias and the served version disagreeing.
    with FileLock(str(lock_path), timeout=params.serve.timeout_s * 4):
        previous = tracking.alias_version(name, tracking.CHAMPION)
        client.set_registered_model_alias(name, tracking.CHAMPION, version)
        server = running_server(root)
        if server is not None:
            try:
                smoke_x, expected = smoke_check(params, root, f"models:/{name}/{version}")
                verify(server, name, version, smoke_x, expected, params.serve.timeout_s)
            except (PromotionError, OSError, ValueError, KeyError) as err:
                _restore(client, server, name, previous)
                back = f"v{previous.version}" if previous else "no champion"
                raise PromotionError(
                    f"serving target failed verification of v{version}: {err}; @champion restored to {back}"
                ) from None
        if previous is not None and previous.version != version:
            client.set_registered_model_alias(name, tracking.PREVIOUS, previous.version)
    moved = previous is None or previous.version != version
    return {
        "promoted": True,
        "name": name,
        "version": version,
        "previous": previous.version if previous else None,
        "served_by": server.url if server else None,
        "summary": (
            f"@champion → {name} v{version}"
            + (f" (was v{previous.version})" if previous and moved else "")
            + ("" if moved else " (already champion)")
            + (
                f"; {server.url} serves it, verified"
                if server
                else "; no server running (start one: tollgate serve)"
            )
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


def rollback(params: Params, root: Path, to: str | None = None) -> dict:
    """Make `to` (default: @previous) the champion again, verified like a promotion."""
    tracking.connect(params, root)
    name = params.registry.model_name
    if to is None:
        ref = tracking.alias_version(name, tracking.PREVIOUS)
        if ref is None:
            raise PromotionError(f"{name} has no @previous version to roll back to; name one with --to")
        to = ref.version
    return move_champion(params, root, str(to))


def promote(params: Params, root: Path, version: str) -> dict:
    """`move_champion`, then hand the champion to `serve.target` when it is not the local server: what
    `tollgate promote` and the Prefect `promote` flow both do."""
    tracking.connect(params, root)
    result = move_champion(params, root, version)
    if params.serve.target != "local":
        from pipeline.deploy import deploy

        result["deploy"] = deploy(params, root, params.serve.target)
        result["summary"] += "; " + result["deploy"]["summary"]
    return result
