"""A canary rollout (`promote.strategy: canary`): the candidate serves a rising share of live requests beside
the champion, step by step, and each step's analysis (pipeline/evaluation/canary.py) decides whether it goes
on; at 100 % it becomes @champion through the usual guarded, fenced, verified move (promote.py), else it is
rolled back and the champion never moved.

Everything a rollout is lives in the registry, where every replica reads it:

- `@canary` names the candidate; the registered model's tag `tollgate.canary.weight` is its share (%);
  servers load both and route by them (pipeline/serving/routing.py);
- the tag `tollgate.canary.rollout` holds the rollout's state (candidate, champion it started from, step,
  when the step began, which process drives it); the version's tag `tollgate.canary.result` says how it
  ended, with the reason.

So a rollout survives its driver dying: `tollgate promote --resume` takes it over at the step it was in
(with a fresh window), and a server of this checkout starting while the recorded driver is dead rolls it
back; neither leaves a weight behind without a rollout that owns it. Order keeps servers consistent: the
weight is set to 0 before @canary moves or goes, so no server routes to a model the alias no longer names.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pipeline.core import failpoints
from pipeline.core.config import Params
from pipeline.core.notify import notify
from pipeline.evaluation import canary as analysis
from pipeline.registry.store import CANARY, CANARY_WEIGHT, CHAMPION, Reads, Store
from pipeline.release import guard
from pipeline.release.promote import (
    UNCHECKED,
    Fenced,
    PromotionError,
    direct,
    interrupted,
    lock,
    recover,
    replicas,
)
from pipeline.release.promote import _release as release_champion
from pipeline.release.promote import _smoke as smoke_check
from pipeline.release.results import Promotion
from pipeline.serving.client import Server, Unreachable, running_server

STATE = "tollgate.canary.rollout"  # on the registered model
RESULT = "tollgate.canary.result"  # on the version rolled out


def release_for(params: Params):
    """What promote's `release` is under `promote.strategy`."""
    return drive if params.promote.strategy == "canary" else direct


@dataclass
class Driver:
    host: str
    pid: int
    created: float

    @classmethod
    def me(cls) -> Driver:
        import psutil

        return cls(socket.gethostname(), os.getpid(), psutil.Process().create_time())

    def alive(self) -> bool | None:
        """True or False for a process of this machine; None for another machine's (it cannot be seen)."""
        import psutil

        if self.host != socket.gethostname():
            return None
        try:
            return psutil.Process(self.pid).create_time() == self.created
        except psutil.Error:
            return False


@dataclass
class Rollout:
    version: str
    before: str | None  # the champion it started from, which the move at 100 % is fenced against
    gated: str | None  # the champion its gate compared with ("unchecked": none to fence by)
    step: int
    step_started: float
    started: float
    driver: Driver
    done: list[str] = field(default_factory=list)  # one line per passed step

    def dump(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def load(cls, text: str) -> Rollout:
        raw = json.loads(text)
        return cls(**{**raw, "driver": Driver(**raw["driver"])})


def current(store: Reads, name: str) -> Rollout | None:
    text = store.model_tags(name).get(STATE)
    return Rollout.load(text) if text else None


def _save(store: Store, name: str, rollout: Rollout) -> None:
    store.tag_model(name, STATE, rollout.dump())


# ---- the servers ---------------------------------------------------------------------------------------


def _servers(params: Params, root: Path) -> list[Server]:
    """This checkout's server (told to reload at once) and the replicas (which follow by themselves)."""
    try:
        local = running_server(root, params.promote.timeout_s)
    except Unreachable as err:
        raise PromotionError(str(err)) from None
    return ([local] if local else []) + [Server(url) for url in replicas(params)]


def _canary_of(server: Server, name: str, timeout: float) -> dict | None | str:
    try:
        return server.call("GET", f"/v2/models/{name}", timeout=timeout)["parameters"]["canary"]
    except (OSError, ValueError, KeyError) as err:
        return f"no answer ({err})"


def _everywhere(params: Params, root: Path, expected: dict | None) -> None:
    """Make every server serve the canary at `expected` ({version, weight}, or None: no canary) within one
    follow interval plus `promote.timeout_s`, or raise naming those that do not."""
    name, timeout = params.registry.model_name, params.promote.timeout_s
    servers = _servers(params, root)
    for server in servers[:1]:
        if server.token:
            with contextlib.suppress(OSError, ValueError):
                server.call("POST", "/admin/reload", timeout=timeout)
    deadline = time.monotonic() + params.serve.follow_interval_s + timeout
    late = {s.url: None for s in servers}
    while late:
        for server in servers:
            if server.url in late:
                seen = _canary_of(server, name, timeout)
                if seen == expected:
                    del late[server.url]
                else:
                    late[server.url] = seen
        if not late:
            return
        if time.monotonic() > deadline:
            listed = ", ".join(f"{url} has {seen}" for url, seen in late.items())
            raise PromotionError(f"servers did not take canary {expected} in time: {listed}")
        time.sleep(0.2)


def _window(params: Params, root: Path, rollout: Rollout) -> dict[str, analysis.Variant]:
    """This step's answers of the candidate and of the champion it started from, from every server."""
    rows = []
    for server in _servers(params, root):
        got = server.call("GET", f"/admin/canary/window?since={rollout.step_started}", timeout=30.0)
        rows += got["rows"]
    wanted = {analysis.CANARY: rollout.version, analysis.CHAMPION: rollout.before}
    return analysis.window([r for r in rows if wanted[r["variant"]] == r["version"]])


# ---- the steps -----------------------------------------------------------------------------------------


@dataclass
class Step:
    weight: float
    passed: bool
    reason: str
    counts: dict
    checks: list[dict]

    def line(self) -> str:
        return f"{self.weight:g} %: {'passed' if self.passed else 'failed'} ({self.counts})"


def _set_weight(store: Store, params: Params, root: Path, rollout: Rollout, weight: float) -> None:
    store.tag_model(params.registry.model_name, CANARY_WEIGHT, f"{weight:g}")
    _everywhere(params, root, {"version": rollout.version, "weight": weight})


def run_step(store: Store, params: Params, root: Path, rollout: Rollout) -> Step:
    """Route `steps[rollout.step]` % to the canary on every server, wait for the step's window (at least
    `min_requests` answers of each variant and `min_s`; at most `max_s`), and analyse it."""
    cfg, name = params.promote.canary, params.registry.model_name
    weight = cfg.steps[rollout.step]
    _set_weight(store, params, root, rollout, weight)
    rollout.step_started = time.time()
    _save(store, name, rollout)
    print(f"[tollgate] canary v{rollout.version} at {weight:g} % of requests", flush=True)
    while True:
        failpoints.reach("canary:waiting")  # tests kill the driver here, mid-step
        time.sleep(min(1.0, max(cfg.min_s, 0.2)))
        variants = _window(params, root, rollout)
        elapsed = time.time() - rollout.step_started
        counts = {v: variants[v].requests for v in variants}
        need_champion = weight < 100
        enough = counts[analysis.CANARY] >= cfg.min_requests and (
            not need_champion or counts[analysis.CHAMPION] >= cfg.min_requests
        )
        if enough and elapsed >= cfg.min_s:
            verdict = analysis.analyse(variants, cfg)
            return Step(weight, verdict.passed, verdict.reason, counts, verdict.table())
        if elapsed > cfg.max_s:
            reason = f"too little traffic: {counts} answers after {elapsed:.0f} s, {cfg.min_requests} needed"
            return Step(weight, False, reason, counts, [])


# ---- beginning and ending ------------------------------------------------------------------------------


def _refuse_second(store: Store, name: str) -> None:
    existing = current(store, name)
    if existing is None:
        return
    alive = existing.driver.alive()
    who = f"pid {existing.driver.pid} on {existing.driver.host}"
    if alive is False:
        raise PromotionError(
            f"a rollout of v{existing.version} was left by a process that died ({who}): finish it first "
            "with `tollgate promote --resume`; nothing moved"
        )
    raise PromotionError(f"a rollout of v{existing.version} is in progress ({who}); nothing moved")


def begin(store: Store, params: Params, root: Path, version: str, gated_against=UNCHECKED) -> Rollout:
    """Load the candidate as @canary at weight 0 on every server, under the promotion guard, fenced like a
    promotion; the registry then records the rollout."""
    name = params.registry.model_name
    smoke_check(store, params, root, version)  # a version that cannot load never takes traffic
    try:
        with guard.held(params, store.uri), lock(root, params):
            recover(store, params, root)
            _refuse_second(store, name)
            champion = store.version(name, CHAMPION)
            before = champion.version if champion else None
            if gated_against is not UNCHECKED and before not in (gated_against, version):
                raise Fenced(gated_against, before)
            now = time.time()
            gated = "unchecked" if gated_against is UNCHECKED else gated_against
            rollout = Rollout(version, before, gated, 0, now, now, Driver.me())
            store.tag_model(name, CANARY_WEIGHT, "0")
            store.point(name, CANARY, version)
            _save(store, name, rollout)
    except guard.GuardError as err:
        raise PromotionError(f"{err}; nothing moved") from None
    try:
        _everywhere(params, root, {"version": version, "weight": 0.0})
    except PromotionError as err:
        raise PromotionError(abort(store, params, root, rollout, str(err)).reason) from None
    return rollout


def _clear(store: Store, name: str) -> None:
    """Weight first (no tag reads as 0), then the alias, then the state that owned them."""
    store.tag_model(name, CANARY_WEIGHT, None)
    store.point(name, CANARY, None)
    store.tag_model(name, STATE, None)


def _report(rollout: Rollout, steps: list[Step], outcome: str) -> dict:
    return {
        "version": rollout.version,
        "from": rollout.before,
        "outcome": outcome,
        "steps": rollout.done + [s.line() for s in steps if s.line() not in rollout.done],
        "analysis": [{"weight": s.weight, "counts": s.counts, "checks": s.checks} for s in steps],
    }


def abort(
    store: Store, params: Params, root: Path, rollout: Rollout, reason: str, steps=(), wait: bool = True
) -> Promotion:
    """Roll the candidate back: weight 0, @canary removed, the champion untouched; the reason on the version,
    in the result and in a notification."""
    name = params.registry.model_name
    weight = params.promote.canary.steps[rollout.step]
    _clear(store, name)
    text = f"rolled back at {weight:g} %: {reason}"
    store.tag_version(name, rollout.version, RESULT, text)
    note = ""
    if wait:
        try:
            _everywhere(params, root, None)
        except PromotionError as err:
            note = f"; {err}"
    champion = f"v{rollout.before}" if rollout.before else "none"
    line = f"canary v{rollout.version} {text}; @champion unchanged ({champion}){note}"
    print(f"[tollgate] {line}", flush=True)
    notify(params.flow, f"tollgate: {line}")
    report = _report(rollout, list(steps), "rolled back")
    return Promotion(promoted=False, name=name, version=rollout.version, reason=line, canary=report)


def _finish(store: Store, params: Params, root: Path, rollout: Rollout, steps: list[Step]) -> Promotion:
    """At 100 % and passed: @champion moves (guarded, fenced against the champion the rollout started from
    and, through it, the one its gate compared with), then the canary is cleared."""
    name = params.registry.model_name
    gated = UNCHECKED if rollout.gated == "unchecked" else rollout.gated
    fenced_by = rollout.before if gated is UNCHECKED else gated
    try:
        result = release_champion(store, params, root, rollout.version, fenced_by, rollback=False)
    except PromotionError as err:
        return abort(store, params, root, rollout, f"the move to @champion failed: {err}", steps)
    _clear(store, name)
    steps_run = len(params.promote.canary.steps)
    store.tag_version(name, rollout.version, RESULT, f"promoted after {steps_run} steps")
    with contextlib.suppress(PromotionError):
        _everywhere(params, root, None)
    report = _report(rollout, steps, "promoted")
    return result.model_copy(
        update={"canary": report, "summary": f"{result.summary}; canary passed {', '.join(report['steps'])}"}
    )


def steps(store: Store, params: Params, root: Path, rollout: Rollout, run=run_step, seen=None) -> Promotion:
    """Run the steps from the rollout's current one to the end, each through `run` (the Prefect flow passes
    a task) and handed to `seen` once judged; any error rolls the rollout back."""
    name, judged = params.registry.model_name, []
    try:
        while True:
            step = run(store, params, root, rollout)
            judged.append(step)
            if seen is not None:
                seen(rollout, step)
            if not step.passed:
                return abort(store, params, root, rollout, step.reason, judged)
            rollout.done.append(step.line())
            if rollout.step == len(params.promote.canary.steps) - 1:
                return _finish(store, params, root, rollout, judged)
            rollout.step += 1
            _save(store, name, rollout)
    except BaseException as err:  # Ctrl-C or a lost registry or server: back to the champion alone
        with contextlib.suppress(Exception):
            abort(store, params, root, rollout, f"the rollout stopped: {type(err).__name__}: {err}", judged)
        if isinstance(err, Exception) and not isinstance(err, PromotionError):
            raise PromotionError(f"canary v{rollout.version} rolled back: {err}") from None
        raise


def drive(store: Store, params: Params, root: Path, version: str, gated_against=UNCHECKED) -> Promotion:
    """`promote.strategy: canary`: the rollout of `version`, from @canary at 0 % to @champion or back."""
    champion = store.version(params.registry.model_name, CHAMPION)
    if champion is None or champion.version == version:  # nothing to compare with: a direct promotion
        return direct(store, params, root, version, gated_against)
    return steps(store, params, root, begin(store, params, root, version, gated_against))


def resume(store: Store, params: Params, root: Path) -> Promotion:
    """`tollgate promote --resume`: take over a rollout whose driver died, at the step it was in."""
    name = params.registry.model_name
    rollout = current(store, name)
    if rollout is None:
        raise PromotionError(f"{name} has no rollout in progress: nothing to resume")
    alive = rollout.driver.alive()
    if alive is not False:
        where = "" if alive else f" on {rollout.driver.host}, which this machine cannot see"
        raise PromotionError(
            f"the rollout of v{rollout.version} is driven by pid {rollout.driver.pid}{where}; not taken over"
        )
    print(f"[tollgate] resuming the rollout of v{rollout.version} at step {rollout.step + 1}", flush=True)
    rollout.driver = Driver.me()
    _save(store, name, rollout)
    return steps(store, params, root, rollout)


def _abandoned(store: Reads, name: str) -> Rollout | None:
    """The rollout in progress when its driver was a process of this machine that is dead."""
    rollout = current(store, name)
    return rollout if rollout is not None and rollout.driver.alive() is False else None


def abandoned(store: Store, params: Params, root: Path) -> str | None:
    """A rollout whose driver on this machine is dead is rolled back (what a server start does); returns
    what was done."""
    rollout = _abandoned(store, params.registry.model_name)
    if rollout is None:
        return None
    why = f"its promoting process (pid {rollout.driver.pid}) died; rolled back when a server started"
    return abort(store, params, root, rollout, why, wait=False).reason


def recover_for_server(store: Store, params: Params, root: Path) -> None:
    """What a server start repairs, under the promotion lock: a promotion a killed process left half-done
    is finished or undone, an abandoned rollout rolled back."""
    recover(store, params, root)
    abandoned(store, params, root)


@contextlib.contextmanager
def startup(reads: Reads, params: Params, root: Path) -> Iterator[None]:
    """What a champion-following `tollgate serve` starts under: the promotion lock (no promotion can slip
    between what it loads and when promotion can find it), once `recover_for_server` found nothing to
    repair. Repairs are rare and they write, so a child process makes them with MLflow's client, and a
    replica with nothing to repair never loads it."""
    with lock(root, params):
        if interrupted(root) or _abandoned(reads, params.registry.model_name):
            done = subprocess.run([sys.executable, "-m", __name__], cwd=root)
            if done.returncode != 0:
                raise PromotionError(f"repairing the registry before serving failed (exit {done.returncode})")
        yield


def status(store: Store, params: Params, root: Path) -> str:
    """`tollgate canary status`: the rollout in progress, and its step's analysis on the window so far."""
    rollout = current(store, params.registry.model_name)
    if rollout is None:
        return f"{params.registry.model_name}: no canary rollout in progress"
    cfg = params.promote.canary
    alive = {True: "alive", False: "dead: tollgate promote --resume", None: "on another machine"}
    step = f"step {rollout.step + 1}/{len(cfg.steps)} at {cfg.steps[rollout.step]:g} %"
    lines = [
        f"canary v{rollout.version} (champion v{rollout.before}), {step}, for "
        f"{time.time() - rollout.step_started:.0f} s; driver pid {rollout.driver.pid} on "
        f"{rollout.driver.host} ({alive[rollout.driver.alive()]})",
        *(f"  passed {line}" for line in rollout.done),
    ]
    variants = _window(params, root, rollout)
    lines.append(f"  {'variant':<9} {'requests':>8} {'errors':>6} {'labelled':>8} {'right':>6}")
    for variant_name, v in variants.items():
        lines.append(f"  {variant_name:<9} {v.requests:>8} {v.errors:>6} {v.labelled:>8} {v.correct:>6}")
    for check in analysis.analyse(variants, cfg).checks:
        lines.append(f"  {'ok  ' if check.passed else 'FAIL'} {check.name}: {check.detail}")
    return "\n".join(lines)


if __name__ == "__main__":  # `startup`'s child: in the checkout, while its parent holds the lock
    from pipeline.core import paths
    from pipeline.core.config import load_params
    from pipeline.registry.store import connect

    here = Path.cwd()
    settings = load_params(here / paths.PARAMS)
    recover_for_server(connect(settings, here), settings, here)
