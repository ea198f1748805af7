"""What the shadow challenger did beside the champion on live traffic, from its shard records and the
labels users gave (`tollgate shadow`, and the online gate at promotion)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.monitoring.feedback import feedback_labels
from pipeline.monitoring.shards import SHADOW, read_latest


def shadow_summary(folder: Path, feedback: Path, challenger: str | None = None) -> dict:
    """How the challenger (the newest one in shadow, or version `challenger`) did beside the champion on
    live traffic: images, errors, agreement, confidences, its latency, and accuracy of both on the images
    users labelled through POST /feedback."""
    rows = read_latest(folder, SHADOW)
    if not rows:
        return {"challenger": challenger, "images": 0}
    challenger = challenger or str(rows["challenger"][-1])
    keep = rows["challenger"] == challenger
    rows = {k: v[keep] for k, v in rows.items()}
    n = len(rows["time"])
    if n == 0:
        return {"challenger": challenger, "images": 0}
    ok = ~rows["error"]
    agree = rows["pred"][ok] == rows["challenger_pred"][ok]
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
        "agreement": float(agree.mean()) if agree.size else None,
        "disagreement": float(1 - agree.mean()) if agree.size else None,
        "confidence": {
            "champion": float(rows["confidence"][ok].mean()) if ok.any() else None,
            "challenger": float(rows["challenger_confidence"][ok].mean()) if ok.any() else None,
        },
        "latency_ms": {"p50": float(np.percentile(latency, 50)), "p99": float(np.percentile(latency, 99))},
        "labelled": int(labelled.sum()),
        "accuracy": {
            "champion": float((rows["pred"][labelled] == truth[labelled]).mean()) if labelled.any() else None,
            "challenger": float((rows["challenger_pred"][labelled] == truth[labelled]).mean())
            if labelled.any()
            else None,
        },
    }
