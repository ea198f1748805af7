"""A champion-following server re-reads its alias every `serve.follow_interval_s` and swaps to what it
names, the way /admin/reload does: replicas anywhere converge on a promotion without being told."""

from __future__ import annotations

import asyncio
import time

from pipeline.serving.batching import ModelSlot
from pipeline.serving.prometheus import Metrics


async def follow(slot: ModelSlot, metrics: Metrics, interval: float, status: dict) -> None:
    """Check the alias every `interval` seconds. A version that cannot be loaded is counted and retried at
    the next check; the model already loaded keeps serving."""
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(interval)
        before = slot.current.version if slot.current else None
        try:
            served = await loop.run_in_executor(None, slot.reload)
            status["error"] = None
            metrics.served(slot.name, served.version)
            if served.version != before:
                print(f"[tollgate] @champion moved: now serving {slot.name} v{served.version}", flush=True)
        except Exception as err:  # noqa: BLE001 - whatever fails, keep serving and check again
            status["error"] = f"{type(err).__name__}: {err}"
            metrics.follow_errors.inc()
            print(f"[tollgate] cannot follow @champion: {status['error']}", flush=True)
        status["checked_at"] = time.time()
        metrics.alias_checked.set(status["checked_at"])
