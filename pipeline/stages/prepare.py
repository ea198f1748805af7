"""prepare: the source's images, split and written as arrays with a manifest (pipeline/data/prepared.py)."""

from __future__ import annotations

from pathlib import Path

from pipeline.core import paths
from pipeline.core.config import Params
from pipeline.data.prepared import prepare
from pipeline.data.sources import SourceError
from pipeline.stages import StageFailed, log, work


def run(params: Params, root: Path) -> dict:
    try:
        with work():
            manifest = prepare(params.data, params.seed, root / paths.PREPARED_DIR, root / params.data.root)
    except SourceError as err:
        raise StageFailed(str(err)) from None
    sizes = {s: sum(c.values()) for s, c in manifest["counts"].items()}
    log(
        f"prepared {params.data.source}: {sizes}, shape {manifest['image_shape']}, "
        f"data version {manifest['data_version'][:12]}"
    )
    return manifest
