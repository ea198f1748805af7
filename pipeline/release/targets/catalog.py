"""Every serving target by the name `promote.target` gives it: the one place that turns the name into code."""

from __future__ import annotations

from pathlib import Path

from pipeline.core.config import Params
from pipeline.registry.store import Store
from pipeline.release.targets.base import Target
from pipeline.release.targets.kserve import KServeTarget
from pipeline.release.targets.local import LocalTarget
from pipeline.release.targets.mlflow_server import MlflowTarget
from pipeline.release.targets.torchserve import TorchServeTarget

TARGETS: dict[str, type[Target]] = {
    t.name: t for t in (LocalTarget, MlflowTarget, KServeTarget, TorchServeTarget)
}


def get(name: str, store: Store, params: Params, root: Path) -> Target:
    return TARGETS[name](store, params, root)
