"""prepare: the source's images, split and written as arrays with a manifest (pipeline/data/prepared.py)."""

from __future__ import annotations

from pathlib import Path

from pipeline.core import paths
from pipeline.core.config import BACKBONE, DataConfig, Params
from pipeline.data.images import INTERPOLATIONS
from pipeline.data.prepared import prepare
from pipeline.data.sources import SourceError
from pipeline.stages import StageFailed, log, work


def fitted_to_backbone(data: DataConfig, backbone: str) -> DataConfig:
    """`data` with image_size and interpolation `backbone` replaced by what `backbone`'s pretrained weights
    were trained with (timm's pretrained config), so the images are resized as the weights expect."""
    wanted = {k for k in ("image_size", "interpolation") if getattr(data, k) == BACKBONE}
    if not wanted:
        return data
    from pipeline.training.backbones import pretrained_config  # timm (and torch) only when asked for

    expects = pretrained_config(backbone)
    if expects is None:
        raise StageFailed(
            f"data.{' and data.'.join(sorted(wanted))}: backbone takes them from train.backbone's pretrained "
            f"weights, and {backbone} has none; give them (e.g. image_size: [224, 224], interpolation: "
            "bicubic)"
        )
    if expects["interpolation"] not in INTERPOLATIONS:
        raise StageFailed(
            f"data.interpolation: {backbone}'s weights were resized {expects['interpolation']!r}, which "
            f"prepare does not do; set one of {', '.join(INTERPOLATIONS)}"
        )
    fitted = {"image_size": list(expects["input_size"]), "interpolation": expects["interpolation"]}
    return data.model_copy(update={k: fitted[k] for k in wanted})


def run(params: Params, root: Path) -> dict:
    data = fitted_to_backbone(params.data, params.train.backbone)
    if data is not params.data:
        log(f"resizing {data.image_size} {data.interpolation}, as {params.train.backbone}'s weights expect")
    try:
        with work():
            manifest = prepare(data, params.seed, root / paths.PREPARED_DIR, root / data.root)
    except SourceError as err:
        raise StageFailed(str(err)) from None
    sizes = {s: sum(c.values()) for s, c in manifest["counts"].items()}
    log(
        f"prepared {params.data.source}: {sizes}, shape {manifest['image_shape']}, "
        f"data version {manifest['data_version'][:12]}"
    )
    return manifest
