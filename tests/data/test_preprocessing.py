"""Training/serving skew: an image file must reach the model as the same pixels whether it came in through
prepare (training) or through the server's /predict (serving). Both call pipeline.images; this checks
the whole of both paths, with the files a user would have: grey, RGB, RGBA, palette, JPEG, odd sizes."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from PIL import Image

from pipeline.core.config import load_params
from pipeline.data.prepared import FILES, load_split, prepare, read_manifest
from tests.support import ROOT, config


def _files(root):
    """Two classes of images in every mode and several sizes, PNG and JPEG."""
    rng = np.random.default_rng(0)
    made = []
    for label in ("a", "b"):
        kinds = [
            ("L", (13, 7), "png"), ("RGB", (40, 30), "png"), ("RGBA", (10, 12), "png"), ("P", (9, 33), "png"),
            ("L", (64, 5), "jpg"), ("RGB", (31, 17), "jpg"), ("RGB", (12, 10), "png"), ("L", (12, 10), "jpg"),
            ("RGB", (96, 80), "jpg"),  # many times the target size: libjpeg decodes it at a reduced scale
        ]  # fmt: skip
        for i, (mode, size, suffix) in enumerate(kinds):
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            img = Image.fromarray(pixels, "RGB").convert(mode if mode != "P" else "RGB")
            if mode == "P":
                img = img.quantize(64)
            path = root / label / f"{i}.{suffix}"
            path.parent.mkdir(parents=True, exist_ok=True)
            img.save(path)
            made.append(path)
    return made


def _served_inputs(meta: dict, bodies: list[bytes]) -> list[np.ndarray]:
    """What the model receives when each body is POSTed to /predict of an in-process server."""
    from fastapi.testclient import TestClient

    from pipeline.serving.app import create_app
    from pipeline.serving.batching import ModelSlot, Served
    from pipeline.training.model import build

    model = build(meta).eval()
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(args[0].numpy().copy()))
    params = load_params(ROOT / "params.yaml")
    slot = ModelSlot(None, params.registry.model_name)
    slot.current = Served("1", model, meta)
    with TestClient(create_app(params, slot, "token")) as client:
        for body in bodies:
            resp = client.post("/predict", content=body, headers={"Content-Type": "application/octet-stream"})
            assert resp.status_code == 200, resp.text
    return seen


@pytest.mark.parametrize(("channels", "interpolation"), [(1, "bilinear"), (3, "bilinear"), (3, "bicubic")])
def test_prepare_and_predict_give_the_model_identical_pixels(tmp_path, channels, interpolation):
    from pipeline.training.model import make_meta

    root = tmp_path / "images"
    _files(root)
    out = tmp_path / "prepared"
    prepare(
        config("data", source="imagefolder", root=str(root), image_size=[11, 9], channels=channels,
               interpolation=interpolation), 0, out,
    )  # fmt: skip
    manifest = read_manifest(out)
    with open(out / FILES) as f:
        rows = [r for r in csv.DictReader(f) if int(r["index"]) >= 0]
    assert len(rows) == 18
    trained = [np.asarray(load_split(out, r["split"]).x[int(r["index"])]) for r in rows]
    served = _served_inputs(
        make_meta("small_cnn", 4, manifest), [(root / r["path"]).read_bytes() for r in rows]
    )
    for row, train_pixels, serve_pixels in zip(rows, trained, served, strict=True):
        assert serve_pixels.shape == (1, 11, 9, channels), row["path"]
        # the server hands float32 to the model; training hands uint8: the same integers, bit for bit
        assert np.array_equal(serve_pixels, np.rint(serve_pixels)), row["path"]
        assert serve_pixels[0].astype(np.uint8).tobytes() == train_pixels.tobytes(), row["path"]
