"""Pictures of an evaluation for the MLflow UI (drawn only when logged: matplotlib costs half a second)."""

from __future__ import annotations

import numpy as np


def confusion_figure(cm: np.ndarray, classes: list[str]):
    """The confusion matrix as a matplotlib figure (rows actual, columns predicted)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1 + 0.5 * len(classes), 1 + 0.5 * len(classes)))
    ax.imshow(cm, cmap="Blues")
    ax.set(
        xticks=range(len(classes)),
        yticks=range(len(classes)),
        xticklabels=classes,
        yticklabels=classes,
        xlabel="predicted",
        ylabel="actual",
        title="confusion matrix (test)",
    )
    for (i, j), n in np.ndenumerate(cm):
        ax.text(
            j, i, str(n), ha="center", va="center", fontsize=7, color="white" if n > cm.max() / 2 else "black"
        )
    fig.tight_layout()
    return fig
