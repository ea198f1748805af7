"""The promotion guard: one promotion or rollback at a time per registered model, across every machine
that shares the registry, taken from services the team already runs.

MLflow has no compare-and-set on aliases, so two promoters that read @champion, then move it, can lose an
update (`@previous` skipping a version) or promote past a gate that compared against a champion that has
since changed. The guard makes "read the aliases, check, move" one critical section:

- `prefect`: a Prefect global concurrency limit named `tollgate-promote-<model>` (limit 1) on the server at
  PREFECT_API_URL, acquired strictly (a limit that is inactive or cannot be read is an error, never "no
  lock") and held under a lease that Prefect renews while the holder lives: a holder killed outright frees
  it when the lease runs out. A missing limit is created (limit 1) on first use.
- `postgres`: a session-level advisory lock in the registry's own PostgreSQL database (tracking URI
  `postgresql://…`); PostgreSQL releases it when the holder's connection drops, so a killed holder frees it
  at once.
- `file`: nothing beyond this checkout's promotion lock (`.tollgate/promote.lock`, which every promotion
  takes anyway), enough when the registry is a local store (SQLite or files) on this machine.

`auto` (the default) takes the first that applies, in that order. A shared registry (a tracking server or
a database) with neither a Prefect server nor a PostgreSQL registry is refused, naming what to configure:
promotions from another machine would not wait for this one.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import Iterator

from pipeline.core import paths
from pipeline.core.config import Params
from pipeline.registry.store import local_store


class GuardError(RuntimeError):
    """The guard could not be taken (unreachable service, timeout, nothing shared configured)."""


def kind(params: Params, tracking_uri: str) -> str:
    """Which guard `registry.guard` comes to for this registry and environment."""
    chosen = params.registry.guard
    if chosen != "auto":
        return chosen
    if os.environ.get("PREFECT_API_URL"):
        return "prefect"
    if tracking_uri.startswith("postgresql"):
        return "postgres"
    if local_store(tracking_uri):
        return "file"
    raise GuardError(
        f"the registry at {tracking_uri} is shared, but nothing guards promotions across machines: set "
        "PREFECT_API_URL (a Prefect global concurrency limit guards them), or keep the registry in "
        "PostgreSQL (tracking URI postgresql://…, an advisory lock guards them); registry.guard: file "
        "accepts the risk of racing promotions"
    )


def limit_name(model_name: str) -> str:
    return f"tollgate-promote-{model_name}"


@contextlib.contextmanager
def held(params: Params, tracking_uri: str) -> Iterator[str]:
    """Hold the promotion guard for the duration; yields a description of what is held."""
    chosen = kind(params, tracking_uri)
    name, timeout = params.registry.model_name, params.registry.guard_timeout_s
    start = time.monotonic()
    if chosen == "prefect":
        context = _prefect(name, timeout, params.registry.guard_lease_s)
        what = f"Prefect global concurrency limit {limit_name(name)} at {os.environ['PREFECT_API_URL']}"
    elif chosen == "postgres":
        context = _postgres(tracking_uri, name, timeout)
        what = f"PostgreSQL advisory lock on the registry database for {name}"
    else:
        if not local_store(tracking_uri):
            print(
                f"[tollgate] WARNING: registry.guard is file but the registry at {tracking_uri} is shared: "
                "promotions from other machines are not serialised with this one",
                flush=True,
            )
        context = contextlib.nullcontext()
        what = f"checkout's lock file {paths.PROMOTE_LOCK} alone"
    print(f"[tollgate] promotion guard: taking the {what}", flush=True)
    with context:
        print(f"[tollgate] promotion guard: held after {time.monotonic() - start:.2f} s", flush=True)
        yield what


@contextlib.contextmanager
def _prefect(model_name: str, timeout: float, lease: float) -> Iterator[None]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    name = limit_name(model_name)
    try:
        with get_client(sync_client=True) as client:
            try:
                client.read_global_concurrency_limit_by_name(name)
            except ObjectNotFound:
                with contextlib.suppress(ObjectAlreadyExists):  # another promoter created it first
                    client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
                print(f"[tollgate] created the Prefect global concurrency limit {name} (limit 1)", flush=True)
        holding = contextlib.ExitStack()
        holding.enter_context(
            concurrency(name, occupy=1, timeout_seconds=timeout, lease_duration=lease, strict=True)
        )
    except TimeoutError:
        raise GuardError(f"another promotion holds {name}; gave up after {timeout:g} s") from None
    except Exception as err:  # noqa: BLE001 - unreachable server, inactive limit, ...: never "no lock"
        why = f"{type(err).__name__}: {err}"
        raise GuardError(f"cannot take the Prefect concurrency limit {name}: {why}") from None
    with holding:
        yield


def _advisory_key(model_name: str) -> int:
    """A signed 64-bit key for pg_advisory_lock, the same on every machine for one model."""
    digest = hashlib.sha256(f"tollgate-promote:{model_name}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


@contextlib.contextmanager
def _postgres(uri: str, model_name: str, timeout: float) -> Iterator[None]:
    import sqlalchemy

    key = _advisory_key(model_name)
    engine = sqlalchemy.create_engine(uri, poolclass=sqlalchemy.pool.NullPool)
    try:
        conn = engine.connect()
    except sqlalchemy.exc.SQLAlchemyError as err:
        raise GuardError(f"cannot reach the registry database for the advisory lock: {err}") from None
    try:
        deadline = time.monotonic() + timeout
        said = False
        while not conn.execute(sqlalchemy.text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar():
            if time.monotonic() > deadline:
                raise GuardError(f"another promotion holds the advisory lock; gave up after {timeout:g} s")
            if not said:
                print("[tollgate] waiting for another promotion (PostgreSQL advisory lock)", flush=True)
                said = True
            time.sleep(0.2)
        try:
            yield
        finally:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
    finally:
        conn.close()
        engine.dispose()
