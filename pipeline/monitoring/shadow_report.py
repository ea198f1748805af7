"""What the shadow challenger did beside the champion on live traffic, from its shard records and the
labels users gave (`tollgate shadow`, and the online gate at promotion).

`disagreement` counts every shadow image on which the challenger did not give the champion's answer, the
ones it failed on included: a challenger that errors is not a challenger that agrees.
"""

from __future__ import annotations

import numpy as np

from pipeline.data import shards
from pipeline.data.feedback import feedback_labels


def _mean(values: np.ndarray) -> float | None:
    return float(values.mean()) if values.size else None


def shadow_summary(live: shards.Folder, feedback: shards.Folder, challenger: str | None = None) -> dict:
    """How the challenger (the newest one in shadow, or version `challenger`) did beside the champion on
    live traffic: images, errors, agreement, confidences, its latency, and accuracy of both on the images
    users labelled through POST /feedback."""
    reading = shards.Reading()
    rows = shards.read_latest(live, shards.SHADOW, reading=reading)
    if not rows:
        return {"challenger": challenger, "images": 0, "damaged_shards": reading.damaged}
    challenger = challenger or str(rows["challenger"][-1])
    keep = rows["challenger"] == challenger
    rows = {k: v[keep] for k, v in rows.items()}
    n = len(rows["time"])
    if n == 0:
        return {"challenger": challenger, "images": 0, "damaged_shards": reading.damaged}
    ok = ~rows["error"].astype(bool)
    agree = ok & (rows["pred"] == rows["challenger_pred"])
    labels = feedback_labels(feedback)
    truth = np.array(
        [labels.get((r, int(i)), "") for r, i in zip(rows["request"], rows["item"], strict=True)]
    )
    labelled = (truth != "") & ok
    latency = rows["latency_ms"]
    return {
        "challenger": challenger,
        "champions": sorted(set(rows["version"].tolist())),
        "images": n,
        "errors": int((~ok).sum()),
        "agreement": float(agree.mean()),
        "disagreement": float(1 - agree.mean()),  # errors count as disagreeing
        "confidence": {
            "champion": _mean(rows["confidence"][ok]),
            "challenger": _mean(rows["challenger_confidence"][ok]),
        },
        "latency_ms": {"p50": float(np.percentile(latency, 50)), "p99": float(np.percentile(latency, 99))},
        "labelled": int(labelled.sum()),
        "accuracy": {
            "champion": _mean(rows["pred"][labelled] == truth[labelled]),
            "challenger": _mean(rows["challenger_pred"][labelled] == truth[labelled]),
        },
        "damaged_shards": reading.damaged,
    }
