"""One verification path: "this serving target predicts like the registry's model on these smoke images".

Infra validation (a candidate served from a fresh process must predict as evaluation did), promotion (the
local server after its reload), replicas (each one after following the alias) and TorchServe (a version
registered beside the serving one) all decide it with `predicts_like`, on images picked by
`smoke_images`, against expected classes from `from_registry` or `from_evaluation`.
"""

from __future__ import annotations

import contextlib
import csv
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.core import paths
from pipeline.data.prepared import load_split, read_manifest
from pipeline.registry.store import Store, model_uri
from pipeline.serving.client import Server


class VerificationFailed(RuntimeError):
    """A target does not predict what it must, or a version cannot be loaded to say what that is."""


@dataclass(frozen=True)
class Smoke:
    x: np.ndarray  # (n, H, W, C) uint8 images
    expected: np.ndarray  # (n,) the class index each must get
    classes: int  # how many classes the model has
    source: str  # who expects them: "the registry's model" or "evaluation"


def smoke_images(root: Path, shape: list[int], n: int) -> np.ndarray:
    """The images a model is checked with: the first `n` of the prepared test split when they fit the model,
    else a fixed random batch (a fresh checkout with no prepared data can still roll back)."""
    with contextlib.suppress(OSError, ValueError, KeyError):
        x = load_split(root / paths.PREPARED_DIR, "test").x
        if list(x.shape[1:]) == list(shape) and len(x):
            return np.asarray(x[:n])
    return np.random.default_rng(0).integers(0, 256, (n, *shape), dtype=np.uint8)


def from_registry(store: Store, name: str, version: str, root: Path, n: int) -> Smoke:
    """Load `version` from the registry as the servers will and predict on the smoke images: what a target
    serving it must reproduce. Any failure means the version cannot be served."""
    from pipeline.training.model import predict_proba

    try:
        model, meta = store.load_model(model_uri(name, version))
        x = smoke_images(root, meta["input_shape"], n)
        expected = predict_proba(model, x).argmax(1).numpy()
    except Exception as err:  # noqa: BLE001 - whatever breaks, this version must not become champion
        raise VerificationFailed(
            f"v{version} cannot be loaded from the registry ({type(err).__name__}: {err})"
        ) from None
    return Smoke(x, expected, len(meta["classes"]), "the registry's model")


def from_evaluation(root: Path, n: int) -> Smoke:
    """The first `n` test images and the classes evaluation predicted for them (plots/confusion.csv keeps
    them): what the packaged candidate must reproduce."""
    classes = read_manifest(root / paths.PREPARED_DIR)["classes"]
    x = smoke_images(root, list(load_split(root / paths.PREPARED_DIR, "test").x.shape[1:]), n)
    with open(root / paths.CONFUSION, newline="") as f:
        predicted = [row["predicted"] for _, row in zip(range(len(x)), csv.DictReader(f), strict=False)]
    return Smoke(x, np.array([classes.index(c) for c in predicted]), len(classes), "evaluation")


def predicts_like(predict: Callable[[np.ndarray], np.ndarray], smoke: Smoke, where: str) -> None:
    """`predict` (images -> class probabilities, as a target answers) gets every smoke image's expected
    class; raises VerificationFailed naming `where` and how many it got wrong."""
    probs = np.asarray(predict(smoke.x))
    if probs.shape != (len(smoke.x), smoke.classes):
        raise VerificationFailed(
            f"{where} output has shape {list(probs.shape)}, expected {[len(smoke.x), smoke.classes]}"
        )
    wrong = int((probs.argmax(1) != smoke.expected).sum())
    if wrong:
        raise VerificationFailed(
            f"{where} predictions differ from {smoke.source} on {wrong} of {len(smoke.x)} smoke images"
        )


# Smoke requests stay this small: 16 photos at 224x224x3 are ~17 MB of scoring JSON, past the default
# serve.max_body_mb (10), and a server refuses such a body while it arrives (the client sees a reset).
REQUEST_BYTES = 1 << 20
JSON_BYTES_PER_PIXEL = 7  # "255.0, "


def request_batches(x: np.ndarray) -> list[np.ndarray]:
    """`x` split into requests of at most REQUEST_BYTES of scoring JSON (at least one image each)."""
    per_image = int(np.prod(x.shape[1:])) * JSON_BYTES_PER_PIXEL
    step = max(1, REQUEST_BYTES // per_image)
    return [x[i : i + step] for i in range(0, len(x), step)]


def scoring(server: Server, timeout: float) -> Callable[[np.ndarray], np.ndarray]:
    """A server's MLflow scoring route as a `predict` for `predicts_like`."""

    def predict(x: np.ndarray) -> np.ndarray:
        answers = [
            server.call("POST", "/invocations", {"inputs": part.astype(float).tolist()}, timeout=timeout)
            for part in request_batches(x)
        ]
        return np.concatenate([np.asarray(out["predictions"]) for out in answers])

    return predict
