"""promote: move @champion to a registered version and make the serving targets follow, or roll back.

`@champion` and the versions the servers answer with must never disagree. Under the promotion guard
(pipeline/release/guard.py: one promotion per model across every machine sharing the registry) and this
checkout's file lock (which a starting server also takes, see `rollout.startup`), a move goes:

1. finish or undo whatever a killed promotion of this checkout left (its intent record, below);
2. re-read @champion: a promotion whose gate compared against another champion is fenced ("champion moved
   from vN to vM since evaluation; re-run evaluate"), so no candidate passes on a stale comparison;
3. find this checkout's server: one that is registered and alive but does not answer fails the move;
4. (before the guard) load the version from the registry the way the servers will and predict on smoke
   images: a version that cannot load (missing artifacts, truncated weights, a registry error) never
   becomes champion; then `promote.target` stages it (a TorchServe version registered and verified, a
   KServe manifest worked out), and a target that cannot take it stops everything here;
5. write the intent record (from, to), move `@champion`, make the local server reload and verify it, and
   wait for every replica (`promote.replicas` / TOLLGATE_REPLICAS: servers that follow the alias by
   themselves) to serve the version and predict like the registry's copy; any exception here puts the
   alias back, and the replicas follow it back;
6. mark the record verified, point `@previous` at the old champion, remove the record; the target commits
   (TorchServe's default version, the KServe manifest written).

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

from pipeline.core import failpoints, paths
from pipeline.core.config import Params
from pipeline.core.errors import Failure
from pipeline.core.files import locked, read_report, write_json
from pipeline.registry.store import CHAMPION, PREVIOUS, Store, VersionRef
from pipeline.release import guard, verify
from pipeline.release.results import Promotion
from pipeline.release.targets import catalog
from pipeline.release.targets.base import Handover, TargetError
from pipeline.serving.client import Server, Unreachable, running_server

ROLLED_BACK = "tollgate.rolled_back"
UNCHECKED = object()  # a rollback: no gate to be fenced by


class PromotionError(Failure):
    """The move did not happen or was undone; the message says why and where the alias stands."""


class Fenced(PromotionError):
    """@champion is no longer the version the candidate's gate compared against: evaluate again."""

    def __init__(self, gated: str | None, now: str | None):
        self.gated, self.now = gated, now
        was, now_ = (f"v{v}" if v else "none" for v in (gated, now))
        super().__init__(f"champion moved from {was} to {now_} since evaluation; re-run evaluate")


def replicas(params: Params) -> list[str]:
    """The servers elsewhere that promotion waits for: TOLLGATE_REPLICAS (comma-separated) or
    promote.replicas."""
    listed = os.environ.get("TOLLGATE_REPLICAS")
    urls = listed.split(",") if listed is not None else params.promote.replicas
    return [u.strip().rstrip("/") for u in urls if u.strip()]


@contextlib.contextmanager
def lock(root: Path, params: Params) -> Iterator[None]:
    """The promotion lock of this checkout: promotions, rollbacks and a server's start take turns."""
    from filelock import Timeout

    waiting = f"waiting for the promotion in progress ({paths.PROMOTE_LOCK})"
    try:
        with locked(root / paths.PROMOTE_LOCK, waiting, timeout=params.promote.timeout_s * 4):
            yield
    except Timeout:
        raise PromotionError(f"another promotion holds {paths.PROMOTE_LOCK}; gave up waiting") from None


def interrupted(root: Path) -> bool:
    """A promotion's process died between moving @champion and finishing (`recover` has work)."""
    return _intent(root).exists()


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


def _follow_deadline(params: Params) -> float:
    return time.monotonic() + params.serve.follow_interval_s + params.promote.timeout_s


def verify_server(server: Server, name: str, version: str, smoke: verify.Smoke, timeout: float) -> None:
    """Reload the server onto @champion, then check it reports `version` and predicts like the registry."""
    served = server.call("POST", "/admin/reload", timeout=timeout)
    if str(served.get("version")) != version:
        raise PromotionError(f"server reloaded version {served.get('version')}, expected {version}")
    meta = server.call("GET", f"/v2/models/{name}", timeout=timeout)
    if str(meta.get("versions", [None])[0]) != version:
        raise PromotionError(f"server reports version {meta.get('versions')}, expected {version}")
    verify.predicts_like(verify.scoring(server, timeout), smoke, server.url)


def verify_replicas(urls: list[str], name: str, version: str, smoke: verify.Smoke, params: Params) -> None:
    """Every replica serves `version` within one follow interval plus `promote.timeout_s`, and predicts
    like the registry's copy of it."""
    deadline = _follow_deadline(params)
    late = {url: seen for url in urls if (seen := _serves(url, name, version, deadline))}
    if late:
        listed = ", ".join(f"{url} still serves {seen}" for url, seen in late.items())
        raise PromotionError(f"replicas did not follow to v{version} in time: {listed}")
    for url in urls:
        verify.predicts_like(verify.scoring(Server(url), params.promote.timeout_s), smoke, url)


def _replicas_back(urls: list[str], name: str, version: str | None, params: Params) -> str:
    """After the alias went back: '' when every replica serves `version` again, else a note naming them."""
    if not urls or version is None:
        return ""
    deadline = _follow_deadline(params)
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
            server = running_server(root, params.promote.timeout_s)
        note = _reload_quietly(server, params.promote.timeout_s)
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
    smoke: verify.Smoke,
    gated_against=UNCHECKED,
    rollback: bool = False,
) -> Promotion:
    """Point @champion at `version` with the servers following and verified on `smoke`, or change nothing
    (see the module docstring for the sequence). A promotion passes `gated_against`, the champion version
    its gate compared with (None: there was none); a rollback marks the version it leaves, still under the
    guard."""
    name = params.registry.model_name
    try:
        with guard.held(params, store.uri), lock(root, params):
            result = _move(store, params, root, version, smoke, gated_against)
            if rollback:
                _mark_rolled_back(store, name, result.previous, version)
            return result
    except guard.GuardError as err:
        raise PromotionError(f"{err}; nothing moved") from None


def _move(
    store: Store, params: Params, root: Path, version: str, smoke: verify.Smoke, gated_against
) -> Promotion:
    name = params.registry.model_name
    timeout = params.promote.timeout_s
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
    failpoints.reach("promote:guarded")
    intent = {"name": name, "from": before, "to": version, "phase": "moving"}
    write_json(_intent(root), {**intent, "pid": os.getpid(), "time": time.time()})
    try:
        store.point(name, CHAMPION, version)
        failpoints.reach("promote:alias-moved")
        if server is not None:
            verify_server(server, name, version, smoke, timeout)
        verify_replicas(followers, name, version, smoke, params)
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
    return _moved(name, version, previous, server, followers)


def _moved(
    name: str, version: str, previous: VersionRef | None, server: Server | None, followers: list[str]
) -> Promotion:
    moved = previous is None or previous.version != version
    summary = (
        f"@champion → {name} v{version}"
        + (f" (was v{previous.version})" if previous and moved else "")
        + ("" if moved else " (already champion)")
        + (
            f"; {server.url} serves it, verified"
            if server
            else "; no server running (start one: tollgate serve)"
        )
        + (f"; {len(followers)} replica(s) follow it, verified" if followers else "")
    )
    return Promotion(
        promoted=True,
        name=name,
        version=version,
        previous=previous.version if previous else None,
        served_by=server.url if server else None,
        summary=summary,
        replicas=followers,
    )


def _mark_rolled_back(store: Store, name: str, left: str | None, to: str) -> None:
    if left is not None and left != to:
        store.tag_version(
            name, left, ROLLED_BACK, f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} to v{to}"
        )
    store.tag_version(name, to, ROLLED_BACK, None)  # chosen on purpose now: no longer "rolled back"


def _tags(store: Store, params: Params, version: str) -> dict[str, str]:
    try:
        return store.version_tags(params.registry.model_name, version)
    except LookupError as err:
        raise PromotionError(str(err)) from None


def _smoke(store: Store, params: Params, root: Path, version: str) -> verify.Smoke:
    try:
        return verify.from_registry(
            store, params.registry.model_name, version, root, params.promote.smoke_images
        )
    except verify.VerificationFailed as err:
        raise PromotionError(f"{err}; nothing moved") from None


def _release(
    store: Store, params: Params, root: Path, version: str, gated_against, rollback: bool
) -> Promotion:
    """The version staged on `promote.target`, @champion moved with the servers verified, then the target
    committed; a target that cannot take it, or a move that fails, leaves everything as it was."""
    target = catalog.get(params.promote.target, store, params, root)
    smoke = _smoke(store, params, root, version)
    try:
        handover = target.stage(version, smoke)
    except TargetError as err:
        raise PromotionError(f"{target.title} cannot take v{version}: {err}; nothing moved") from None
    try:
        result = move_champion(store, params, root, version, smoke, gated_against, rollback)
    except PromotionError:
        target.abort(handover)
        raise
    done = target.commit(handover)
    if not done.summary:
        return result
    return result.model_copy(update={"deploy": done.record(), "summary": f"{result.summary}; {done.summary}"})


def rollback(store: Store, params: Params, root: Path, to: str | None = None) -> Promotion:
    """Make `to` (default: @previous) the champion again, verified like a promotion. The version left
    behind is marked as rolled back, so the pipeline does not promote it again by itself."""
    name = params.registry.model_name
    if to is None:
        ref = store.version(name, PREVIOUS)
        if ref is None:
            raise PromotionError(f"{name} has no @previous version to roll back to; name one with --to")
        to = ref.version
    _tags(store, params, str(to))
    return _release(store, params, root, str(to), UNCHECKED, rollback=True)


def requires_clean(params: Params) -> bool:
    """`promote.require_clean`, or TOLLGATE_REQUIRE_CLEAN when set (the team deployment sets it)."""
    given = os.environ.get("TOLLGATE_REQUIRE_CLEAN")
    return params.promote.require_clean if given is None else given.strip().lower() in ("1", "true", "yes")


def _check_clean(params: Params, tags: dict[str, str], version: str) -> None:
    """With `promote.require_clean`, only a version built from committed code and params may serve: its
    registration recorded the checkout's state (tag git_dirty)."""
    if requires_clean(params) and tags.get("git_dirty") != "false":
        raise PromotionError(
            f"v{version} was built from uncommitted code or params (git_dirty: {tags.get('git_dirty')}) and "
            "promote.require_clean is on: commit, run the pipeline again, then promote; nothing moved"
        )


def direct(store: Store, params: Params, root: Path, version: str, gated_against=UNCHECKED) -> Promotion:
    """`promote.strategy: direct`: the whole of traffic moves to `version` at once, verified."""
    return _release(store, params, root, version, gated_against, rollback=False)


def promote(
    store: Store, params: Params, root: Path, version: str, gated_against=UNCHECKED, release=direct
) -> Promotion:
    """What the promote stage does for the version register just made: `release` it (fenced by the
    champion its gate compared against: `direct`, or a canary rollout), unless that version was rolled
    back on purpose."""
    name = params.registry.model_name
    tags = _tags(store, params, version)
    mark = tags.get(ROLLED_BACK)
    if mark:
        return Promotion(
            promoted=False,
            name=name,
            version=version,
            reason=f"v{version} was rolled back ({mark}); not promoted again by the pipeline. "
            f"To make it champion on purpose: tollgate rollback --to {version}",
        )
    _check_clean(params, tags, version)
    return release(store, params, root, version, gated_against)


def promote_version(store: Store, params: Params, root: Path, version: str, release=direct) -> Promotion:
    """`tollgate promote --version N`: make a registered version champion on purpose (a DVC experiment's
    candidate, say), verified on every server and target like any promotion. Its gate must have passed; a
    rolled-back mark on it is cleared, since it is chosen now."""
    tags = _tags(store, params, version)
    if not tags.get("gate", "").startswith("passed"):
        raise PromotionError(
            f"v{version} has no passing gate (gate: {tags.get('gate', 'none')}); nothing moved"
        )
    _check_clean(params, tags, version)
    result = release(store, params, root, version, UNCHECKED)
    if result.promoted:
        store.tag_version(params.registry.model_name, version, ROLLED_BACK, None)
    return result


def deploy(store: Store, params: Params, root: Path, target_name: str) -> Handover:
    """Hand the current @champion to a target (`tollgate deploy --target`): staged and committed, the
    alias left where it is."""
    ref = store.version(params.registry.model_name, CHAMPION)
    if ref is None:
        raise PromotionError(f"{params.registry.model_name} has no @champion to deploy")
    target = catalog.get(target_name, store, params, root)
    try:
        return target.commit(target.stage(ref.version, _smoke(store, params, root, ref.version)))
    except TargetError as err:
        raise PromotionError(f"{target.title} cannot take v{ref.version}: {err}") from None
