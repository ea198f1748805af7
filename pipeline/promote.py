"""promote: move @champion to a registered version and make the serving targets follow, or roll back.

`@champion` and the versions the servers answer with must never disagree. Under the promotion guard
(pipeline/guard.py: one promotion per model across every machine sharing the registry) and this
checkout's file lock (which a starting server also takes), a move goes:

1. finish or undo whatever a killed promotion of this checkout left (its intent record, below);
2. re-read @champion: a promotion whose gate compared against another champion is fenced ("champion moved
   from vN to vM since evaluation; re-run evaluate"), so no candidate passes on a stale comparison;
3. find this checkout's server: one that is registered and alive but does not answer fails the move;
4. load the version from the registry the way the servers will and predict on test images: a version that
   cannot load (missing artifacts, truncated weights, a registry error) never becomes champion;
5. write the intent record (from, to), move `@champion`, make the local server reload and verify it, and
   wait for every replica (`serve.replicas` / TOLLGATE_REPLICAS: servers that follow the alias by
   themselves) to serve the version and predict like the registry's copy; any exception here puts the
   alias back, and the replicas follow it back;
6. mark the record verified, point `@previous` at the old champion, remove the record.

A process killed inside 5 leaves the record in phase "moving": the next promote, rollback or server start
undoes the move. Killed inside 6, it finds "verified" and completes it.

A deliberate rollback is remembered on the version it left (tag `tollgate.rolled_back`): the promote stage
re-running for that version (after an unrelated params change) does not put it back; `tollgate rollback
--to N` still does, and clears the mark.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from pipeline import failpoints, guard, paths
from pipeline.config import Params
from pipeline.files import locked, read_report, write_json
from pipeline.serving.client import Server, Unreachable, running_server
from pipeline.tracking import CHAMPION, PREVIOUS, Store, VersionRef, model_uri

ROLLED_BACK = "tollgate.rolled_back"
UNCHECKED = object()  # a rollback: no gate to be fenced by


class PromotionError(RuntimeError):
    """The move did not happen or was undone; the message says why and where the alias stands."""


class Fenced(PromotionError):
    """@champion is no longer the version the candidate's gate compared against: evaluate again."""

    def __init__(self, gated: str | None, now: str | None):
        self.gated, self.now = gated, now
        was, now_ = (f"v{v}" if v else "none" for v in (gated, now))
        super().__init__(f"champion moved from {was} to {now_} since evaluation; re-run evaluate")


def replicas(params: Params) -> list[str]:
    """The servers elsewhere that promotion waits for: TOLLGATE_REPLICAS (comma-separated) or
    serve.replicas."""
    listed = os.environ.get("TOLLGATE_REPLICAS")
    urls = listed.split(",") if listed is not None else params.serve.replicas
    return [u.strip().rstrip("/") for u in urls if u.strip()]


@contextlib.contextmanager
def lock(root: Path, params: Params) -> Iterator[None]:
    """The promotion lock of this checkout: promotions, rollbacks and a server's start take turns."""
    from filelock import Timeout

    waiting = f"waiting for the promotion in progress ({paths.PROMOTE_LOCK})"
    try:
        with locked(root / paths.PROMOTE_LOCK, waiting, timeout=params.serve.timeout_s * 4):
            yield
    except Timeout:
        raise PromotionError(f"another promotion holds {paths.PROMOTE_LOCK}; gave up waiting") from None


def _smoke_images(root: Path, shape: list[int], n: int) -> np.ndarray:
    """Test images to check a model with: the prepared test split when it fits the model, else a fixed
    random batch (a fresh checkout with no prepared data can still roll back)."""
    from pipeline.data import load_split

    with contextlib.suppress(OSError, ValueError, KeyError):
        x = load_split(root / paths.PREPARED_DIR, "test").x
        if list(x.shape[1:]) == list(shape) and len(x):
            return np.asarray(x[:n])
    return np.random.default_rng(0).integers(0, 256, (n, *shape), dtype=np.uint8)


def smoke_check(store: Store, params: Params, root: Path, version: str) -> tuple[np.ndarray, np.ndarray]:
    """Load `version` from the registry as the server will and predict on test images: the images and the
    classes a server serving it must reproduce. Any failure means the version cannot be served."""
    from pipeline.model import predict_proba

    name = params.registry.model_name
    try:
        model, meta = store.load_model(model_uri(name, version))
        smoke_x = _smoke_images(root, meta["input_shape"], params.serve.smoke_images)
        return smoke_x, predict_proba(model, smoke_x).argmax(1).numpy()
    except Exception as err:  # noqa: BLE001 - whatever breaks, this version must not become champion
        raise PromotionError(
            f"v{version} cannot be loaded from the registry ({type(err).__name__}: {err}); nothing moved"
        ) from None


def verify(
    server: Server, name: str, version: str, smoke_x: np.ndarray, expected: np.ndarray, timeout: float
):
    """Reload the server onto @champion, then check it reports `version` and predicts like the registry."""
    served = server.call("POST", "/admin/reload", timeout=timeout)
    if str(served.get("version")) != version:
        raise PromotionError(f"server reloaded version {served.get('version')}, expected {version}")
    meta = server.call("GET", f"/v2/models/{name}", timeout=timeout)
    if str(meta.get("versions", [None])[0]) != version:
        raise PromotionError(f"server reports version {meta.get('versions')}, expected {version}")
    verify_predictions(server, smoke_x, expected, timeout)


def verify_predictions(server: Server, smoke_x: np.ndarray, expected: np.ndarray, timeout: float) -> None:
    out = server.call("POST", "/invocations", {"inputs": smoke_x.astype(float).tolist()}, timeout=timeout)
    got = np.asarray(out["predictions"]).argmax(1)
    if not np.array_equal(got, expected):
        raise PromotionError(
            f"{server.url} predictions differ from the registry's model on {int((got != expected).sum())} "
            f"of {len(expected)} smoke images"
        )


def _serves(url: str, name: str, version: str | None, deadline: float) -> str | None:
    """Wait until the replica at `url` reports `version`; None when it does, else what it reports."""
    seen = "nothing"
    while True:
        try:
            seen = "v" + str(Server(url).call("GET", f"/v2/models/{name}", timeout=5.0)["versions"][0])
            if seen == f"v{version}":
                return None
        except (OSError, ValueError, KeyError) as err:
            seen = f"no answer ({err})"
        if time.monotonic() > deadline:
            return seen
        time.sleep(0.2)


def verify_replicas(
    urls: list[str], name: str, version: str, smoke_x: np.ndarray, expected: np.ndarray, params: Params
) -> None:
    """Every replica serves `version` within one follow interval plus `serve.timeout_s`, and predicts
    like the registry's copy of it."""
    deadline = time.monotonic() + params.serve.follow_interval_s + params.serve.timeout_s
    late = {url: seen for url in urls if (seen := _serves(url, name, version, deadline))}
    if late:
        listed = ", ".join(f"{url} still serves {seen}" for url, seen in late.items())
        raise PromotionError(f"replicas did not follow to v{version} in time: {listed}")
    for url in urls:
        verify_predictions(Server(url), smoke_x, expected, params.serve.timeout_s)


def _replicas_back(urls: list[str], name: str, version: str | None, params: Params) -> str:
    """After the alias went back: '' when every replica serves `version` again, else a note naming them."""
    if not urls or version is None:
        return ""
    deadline = time.monotonic() + params.serve.follow_interval_s + params.serve.timeout_s
    stuck = [url for url in urls if _serves(url, name, version, deadline)]
    return f"; replicas not back on v{version}: {', '.join(stuck)}" if stuck else ""


def _intent(root: Path) -> Path:
    return root / paths.PROMOTION_INTENT


def _reload_quietly(server: Server | None, timeout: float) -> str:
    """Point the server back at @champion; '' or a note saying it could not be reloaded."""
    if server is None:
        return ""
    try:
        server.call("POST", "/admin/reload", timeout=timeout)
    except (OSError, ValueError) as err:
        return f"; the server at {server.url} could not be reloaded ({err}): restart it"
    return ""


def recover(store: Store, params: Params, root: Path) -> str | None:
    """Finish (phase verified) or undo (phase moving) a promotion whose process died; call under `lock`.
    Returns what was done, or None when nothing was pending."""
    intent = read_report(_intent(root))
    if not intent:
        return None
    name, before, after = intent["name"], intent["from"], intent["to"]
    if intent["phase"] == "verified":
        if before is not None and before != after:
            store.point(name, PREVIOUS, before)
        done = f"completed the interrupted promotion of v{after}"
    else:
        store.point(name, CHAMPION, before)
        server = None
        with contextlib.suppress(Unreachable):
            server = running_server(root, params.serve.timeout_s)
        note = _reload_quietly(server, params.serve.timeout_s)
        now = f"v{before}" if before else "unset"
        done = f"undid the interrupted promotion of v{after}: @champion is {now}{note}"
    _intent(root).unlink(missing_ok=True)
    print(f"[tollgate] {done}", flush=True)
    return done


def move_champion(
    store: Store,
    params: Params,
    root: Path,
    version: str,
    gated_against=UNCHECKED,
    rollback: bool = False,
    smoke: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict:
    """Point @champion at `version` with the servers following and verified, or change nothing (see the
    module docstring for the sequence). Promotion and rollback both come through here; a promotion passes
    `gated_against`, the champion version its gate compared with (None: there was none); a rollback
    marks the version it leaves, still under the guard. `smoke` is `smoke_check`'s result for `version`
    when the caller already has it."""
    from mlflow.exceptions import MlflowException

    name = params.registry.model_name
    try:
        store.client.get_model_version(name, version)
    except MlflowException as err:
        raise PromotionError(f"{name} has no version {version}: {err.message}") from None
    try:
        with guard.held(params, store.uri), lock(root, params):
            result = _move(store, params, root, version, gated_against, smoke)
            if rollback:
                _mark_rolled_back(store, name, result["previous"], version)
            return result
    except guard.GuardError as err:
        raise PromotionError(f"{err}; nothing moved") from None


def _move(store: Store, params: Params, root: Path, version: str, gated_against, smoke) -> dict:
    name = params.registry.model_name
    timeout = params.serve.timeout_s
    recover(store, params, root)
    previous = store.version(name, CHAMPION)
    before = previous.version if previous else None
    if gated_against is not UNCHECKED and before not in (gated_against, version):
        raise Fenced(gated_against, before)
    try:
        server = running_server(root, timeout)
    except Unreachable as err:
        raise PromotionError(f"{err}; nothing moved (a busy or stuck server is not an absent one)") from None
    followers = replicas(params)
    smoke_x, expected = smoke or smoke_check(store, params, root, version)
    failpoints.reach("promote:guarded")
    intent = {"name": name, "from": before, "to": version, "phase": "moving"}
    write_json(_intent(root), {**intent, "pid": os.getpid(), "time": time.time()})
    try:
        store.point(name, CHAMPION, version)
        failpoints.reach("promote:alias-moved")
        if server is not None:
            verify(server, name, version, smoke_x, expected, timeout)
        verify_replicas(followers, name, version, smoke_x, expected, params)
    except BaseException as err:  # anything at all, Ctrl-C included: put every side back
        store.point(name, CHAMPION, before)
        note = _reload_quietly(server, timeout) + _replicas_back(followers, name, before, params)
        _intent(root).unlink(missing_ok=True)
        if not isinstance(err, Exception):
            raise
        back = f"v{before}" if before else "no champion"
        raise PromotionError(
            f"serving target failed verification of v{version}: {err}; @champion restored to {back}{note}"
        ) from None
    write_json(_intent(root), {**intent, "phase": "verified"})
    failpoints.reach("promote:verified")
    if before is not None and before != version:
        store.point(name, PREVIOUS, before)
    _intent(root).unlink(missing_ok=True)
    result = _moved(name, version, previous, server)
    if followers:
        result["replicas"] = followers
        result["summary"] += f"; {len(followers)} replica(s) follow it, verified"
    return result


def _moved(name: str, version: str, previous: VersionRef | None, server: Server | None) -> dict:
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


def rollback(store: Store, params: Params, root: Path, to: str | None = None) -> dict:
    """Make `to` (default: @previous) the champion again, verified like a promotion. The version left
    behind is marked as rolled back, so the pipeline does not promote it again by itself."""
    name = params.registry.model_name
    if to is None:
        ref = store.version(name, PREVIOUS)
        if ref is None:
            raise PromotionError(f"{name} has no @previous version to roll back to; name one with --to")
        to = ref.version
    if params.serve.target == "torchserve":
        return _move_with_torchserve(store, params, root, str(to), UNCHECKED, rollback=True)
    return move_champion(store, params, root, str(to), rollback=True)


def _mark_rolled_back(store: Store, name: str, left: str | None, to: str) -> None:
    from mlflow.exceptions import MlflowException

    if left is not None and left != to:
        store.client.set_model_version_tag(
            name, left, ROLLED_BACK, f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} to v{to}"
        )
    with contextlib.suppress(MlflowException):  # chosen on purpose now: no longer "rolled back"
        store.client.delete_model_version_tag(name, to, ROLLED_BACK)


def promote(store: Store, params: Params, root: Path, version: str, gated_against=UNCHECKED) -> dict:
    """What the promote stage does for the version register just made: `move_champion` (fenced by the
    champion its gate compared against), unless that version was rolled back on purpose, then hand the
    champion to `serve.target` when it is not the local server."""
    name = params.registry.model_name
    mark = store.client.get_model_version(name, version).tags.get(ROLLED_BACK)
    if mark:
        return {
            "promoted": False,
            "name": name,
            "version": version,
            "reason": f"v{version} was rolled back ({mark}); not promoted again by the pipeline. "
            f"To make it champion on purpose: tollgate rollback --to {version}",
        }
    if params.serve.target == "torchserve":
        return _move_with_torchserve(store, params, root, version, gated_against)
    planned = None
    if params.serve.target != "local":
        from pipeline import deploy

        try:
            planned = deploy.plan(store, params, params.serve.target, version)
        except LookupError as err:
            target = params.serve.target
            raise PromotionError(f"serve.target {target} cannot take v{version}: {err}") from None
    result = move_champion(store, params, root, version, gated_against)
    if planned is not None:
        result["deploy"] = deploy.apply(root, planned)
        result["summary"] += "; " + result["deploy"]["summary"]
    return result


def _move_with_torchserve(
    store: Store, params: Params, root: Path, version: str, gated_against, rollback: bool = False
) -> dict:
    """TorchServe takes the version first (archive built, registered beside the serving one, checked
    against the registry's model); then @champion moves, then TorchServe's default does. Whatever fails
    before the alias moved leaves TorchServe serving what it served."""
    from pipeline import torchserve

    smoke_x, expected = smoke_check(store, params, root, version)
    try:
        client, fresh = torchserve.stage_version(store, params, root, version, smoke_x, expected)
    except torchserve.TorchServeError as err:
        raise PromotionError(f"TorchServe cannot take v{version}: {err}; nothing moved") from None
    try:
        result = move_champion(store, params, root, version, gated_against, rollback, (smoke_x, expected))
    except PromotionError:
        if fresh:  # the alias did not move: TorchServe forgets the version it was shown
            with contextlib.suppress(torchserve.TorchServeError):
                client.unregister(version)
        raise
    result["deploy"] = {
        "target": "torchserve",
        "summary": torchserve.make_default(client, params, root, version),
    }
    result["summary"] += "; " + result["deploy"]["summary"]
    return result
