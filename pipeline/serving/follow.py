"""A champion-following server re-reads its aliases every `serve.follow_interval_s` and swaps to what they
name, the way /admin/reload does: replicas anywhere converge on a promotion, and on a canary and its
weight, without being told."""

from __future__ import annotations

import asyncio
import time

from pipeline.registry.store import CANARY
from pipeline.serving.context import ServerContext


def sync_canary(ctx: ServerContext) -> None:
    """Load what @canary names (or drop it when the alias is gone) and read its weight. A canary that
    cannot be loaded gets weight 0 here, so nothing is routed to a model this server does not have."""
    if ctx.canary is None:
        return
    store, name = ctx.slot.store, ctx.name
    before = ctx.canary.current.version if ctx.canary.current else None
    ref = store.version(name, CANARY)
    try:
        if ref is None:
            ctx.canary.clear()
            ctx.canary_weight = 0.0
        else:
            ctx.canary.reload()
            ctx.canary_weight = store.canary_weight(name)
    except Exception:
        ctx.canary_weight = 0.0
        raise
    finally:
        now = ctx.canary.current.version if ctx.canary.current else None
        ctx.metrics.canary_served(name, now, ctx.canary_weight)
    if now != before:
        ctx.recent.clear()  # a window never mixes two canaries
        print(f"[tollgate] @canary: {f'{name} v{now}' if now else 'none'}", flush=True)


def reload_all(ctx: ServerContext):
    """Champion, then canary, as the registry names them now; the champion as served."""
    served = ctx.slot.reload()
    ctx.metrics.served(ctx.name, served.version)
    sync_canary(ctx)
    return served


async def follow(ctx: ServerContext) -> None:
    """Check the aliases every `serve.follow_interval_s`. A version that cannot be loaded is counted and
    retried at the next check; the model already loaded keeps serving."""
    loop = asyncio.get_running_loop()
    status, slot, metrics = ctx.followed, ctx.slot, ctx.metrics
    while True:
        await asyncio.sleep(ctx.params.serve.follow_interval_s)
        before = slot.current.version if slot.current else None
        try:
            served = await loop.run_in_executor(None, reload_all, ctx)
            status["error"] = None
            if served.version != before:
                print(f"[tollgate] @champion moved: now serving {slot.name} v{served.version}", flush=True)
        except Exception as err:  # noqa: BLE001 - whatever fails, keep serving and check again
            status["error"] = f"{type(err).__name__}: {err}"
            metrics.follow_errors.inc()
            print(f"[tollgate] cannot follow @champion: {status['error']}", flush=True)
        status["checked_at"] = time.time()
        metrics.alias_checked.set(status["checked_at"])
