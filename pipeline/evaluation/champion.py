"""The current @champion, loaded from the registry and scored now on the candidate's test split: the gate
compares like with like, never with a figure recorded on other data or by other code."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.core.config import EvaluateConfig
from pipeline.data.prepared import Dataset
from pipeline.evaluation.metrics import quality_metrics, slice_accuracy
from pipeline.registry.store import CHAMPION, Store
from pipeline.training.model import predict_proba


@dataclass(frozen=True)
class Champion:
    version: str
    classes: list[str] | None  # None: it could not be loaded
    metrics: dict | None  # None: it cannot be scored on this data (other classes or image shape)
    error: str | None = None  # why it could not be loaded
    correct: np.ndarray | None = None  # per test image, whether it gets it right (the paired comparison)


def champion_scores(
    store: Store, name: str, test: Dataset, cfg: EvaluateConfig, feedback: Dataset | None = None
) -> Champion | None:
    """The current @champion, loaded from the registry and scored now on this test split (and on the
    feedback slice, as metrics["feedback_accuracy"]), or None when there is no champion."""
    ref = store.version(name, CHAMPION)
    if ref is None:
        return None
    try:
        model, meta = store.load_model(ref.uri)
    except Exception as err:  # noqa: BLE001 - the gate reports it; nothing gets compared with a guess
        return Champion(ref.version, None, None, f"{type(err).__name__}: {err}")
    if meta["classes"] != test.classes or list(meta["input_shape"]) != list(test.x.shape[1:]):
        return Champion(ref.version, meta["classes"], None)

    def probs_of(x):
        return predict_proba(model, x).numpy()

    probs = probs_of(test.x)
    metrics = quality_metrics(probs, test.y, test.classes, cfg)
    if feedback is not None:
        metrics["feedback_accuracy"] = slice_accuracy(probs_of, feedback)
    return Champion(ref.version, meta["classes"], metrics, correct=probs.argmax(axis=1) == test.y)
