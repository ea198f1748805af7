"""The model card's picture of mistakes: its heat maps must point where the model's evidence is, and the
card must report what evaluation measured."""

from __future__ import annotations

import numpy as np

from pipeline.evaluation import mistakes
from pipeline.training.loop import train
from pipeline.training.model import build, make_meta
from tests.support import config

SIDE = 16
CLASSES = ["square", "plus", "none"]


def _shapes(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Class 0: a filled square, class 1: a plus sign, anywhere on noise; class 2: noise alone, so each
    shape class needs its own shape as evidence (not merely the other's absence)."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 60, (n, SIDE, SIDE, 1)).astype(np.uint8)
    y = np.arange(n) % 3
    for i, label in enumerate(y):
        top, left = rng.integers(0, SIDE - 5, 2)
        if label == 0:
            x[i, top + 1 : top + 5, left + 1 : left + 5] = 255
        elif label == 1:
            x[i, top + 2, left : left + 5] = 255
            x[i, top : top + 5, left + 2] = 255
    return x, y


class _Split:
    def __init__(self, x, y):
        self.x, self.y, self.classes = x, y, CLASSES


def test_grad_cam_points_at_the_shape_that_decides_the_class():
    x, y = _shapes(600, 0)
    manifest = {"image_shape": [SIDE, SIDE, 1], "classes": CLASSES, "data_version": "shapes",
                "normalization": {"mean": [0.2], "std": [0.3]}}  # fmt: skip
    meta = make_meta("small_cnn", 8, manifest)
    cfg = config("train", backbone="small_cnn", width=8, epochs=4, threads=1, lr=0.01)
    model = train(cfg, 0, _Split(x[:450], y[:450]), _Split(x[450:], y[450:]), meta).model
    test_x, test_y = _shapes(60, 1)
    test_x, test_y = test_x[test_y < 2], test_y[test_y < 2]
    heat = mistakes.gradcam(model, test_x, test_y.tolist())
    inside = [heat[i][test_x[i, ..., 0] == 255].mean() for i in range(len(test_x))]
    outside = [heat[i][test_x[i, ..., 0] < 255].mean() for i in range(len(test_x))]
    # where the model looked to decide is the shape, wherever it is, not the noise around it
    assert np.mean(np.array(inside) > np.array(outside)) >= 0.9
    assert heat.shape == (40, SIDE, SIDE) and heat.min() >= 0 and heat.max() <= 1


def test_the_grid_shows_the_most_confident_mistakes_of_the_most_confused_pairs(tmp_path):
    y = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    probs = np.array([
        [0.1, 0.8, 0.1], [0.2, 0.7, 0.1], [0.9, 0.05, 0.05],  # two 0 -> 1 mistakes
        [0.1, 0.9, 0.0], [0.6, 0.3, 0.1],                     # one 1 -> 0
        [0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [0.0, 0.0, 1.0],
    ])  # fmt: skip
    cm = np.zeros((3, 3), dtype=int)
    np.add.at(cm, (y, probs.argmax(1)), 1)
    pairs = mistakes.confused_pairs(cm, 4)
    assert pairs == [(0, 1, 2), (1, 0, 1)]
    assert mistakes.worst_mistakes(probs, y, pairs, per_pair=1) == [0, 4]
    x = np.random.default_rng(0).integers(0, 255, (8, 8, 8, 3)).astype(np.uint8)
    rgb = {"mean": [0.5] * 3, "std": [0.25] * 3}
    manifest = {"image_shape": [8, 8, 3], "classes": list("abc"), "data_version": "v", "normalization": rgb}
    model = build(make_meta("small_cnn", 4, manifest))
    shown = mistakes.write_grid(tmp_path / "m.png", model.eval(), x, probs, y, ["a", "b", "c"], pairs, 2)
    assert shown == [0, 1, 4]
    from PIL import Image

    with Image.open(tmp_path / "m.png") as img:
        assert img.format == "PNG" and img.width == 3 * (2 * mistakes.TILE + 8) + 8
    assert not list(tmp_path.glob("*.tmp"))  # written beside, then renamed
