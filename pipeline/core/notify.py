"""Tell people something needs attention: a webhook (`flow.notify_url`), a Prefect notification block
(`flow.notify_block`), both or neither. A pipeline run that fails, a drift check that fires and a canary
rollout that rolls back all say it this way. A notification that cannot be sent is logged, never fatal."""

from __future__ import annotations

import json
import sys

from pipeline.core.config import FlowConfig


def _warning(message: str) -> None:
    """Into the Prefect run's log inside a flow run, else onto stdout (a CLI or stage process)."""
    if "prefect" in sys.modules:
        from prefect.exceptions import MissingContextError
        from prefect.logging import get_run_logger

        try:
            get_run_logger().warning(message)
            return
        except MissingContextError:
            pass
    print(f"[tollgate] WARNING: {message}", flush=True)


def notify(cfg: FlowConfig, text: str) -> None:
    if cfg.notify_url:
        import urllib.request

        body = json.dumps({"text": text}).encode()
        req = urllib.request.Request(cfg.notify_url, body, {"Content-Type": "application/json"})
        try:
            urllib.request.urlopen(req, timeout=10).close()
        except OSError as err:
            _warning(f"notification to {cfg.notify_url} failed: {err}")
    if cfg.notify_block:
        from prefect.blocks.core import Block

        try:
            Block.load(cfg.notify_block).notify(text, subject="tollgate")
        except Exception as err:  # noqa: BLE001 - a missing or misconfigured block must not hide the outcome
            _warning(f"notification through block {cfg.notify_block} failed: {err}")
