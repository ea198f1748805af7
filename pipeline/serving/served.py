"""One loaded model version as a server answers with it: the gated ONNX artefact when the server's runtime
asks for one and the model folder has it (then neither the weights nor torch are loaded), else the eager
model. `tollgate serve` (pipeline.serving.batching) and the TorchServe handler both load and call a model
through this module, so the two cannot answer from different runtimes for the same folder and settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.training import runtimes
from pipeline.training.model_folder import read_meta

if TYPE_CHECKING:
    from pipeline.training.model import Classifier


@dataclass(frozen=True)
class Served:
    """One loaded version: its eager `model`, or the gated ONNX artefact that answers instead (then the
    weights are never loaded, and neither is torch)."""

    version: str
    model: Classifier | None
    meta: dict
    # what drift is measured against (models from before: none), a pipeline.monitoring.drift.Reference;
    # not imported even for typing: the TorchServe archive's requirements follow this module's imports
    reference: object | None = None
    onnx: runtimes.OnnxModel | None = None

    @property
    def runtime(self) -> str:
        return runtimes.TORCH if self.onnx is None else self.onnx.runtime

    def predict(self, x: np.ndarray, embeddings: bool) -> tuple[np.ndarray, np.ndarray | None]:
        if self.onnx is not None:
            probs, emb = self.onnx.predict(x)
            return probs, emb if embeddings else None
        import torch

        from pipeline.training.model import predict_proba, predict_with_embeddings

        if embeddings:
            probs, emb = predict_with_embeddings(self.model, torch.from_numpy(x))
            return probs.numpy(), emb.numpy()
        return predict_proba(self.model, torch.from_numpy(x)).numpy(), None


def read(
    version: str, folder: Path, runtime: str, threads: int = 0, reference: object | None = None
) -> Served:
    """The model in `folder` on `runtime` (`serve.runtime`): the ONNX session the folder's gate chose when
    the runtime is not torch, on `threads` threads, else the eager model."""
    onnx = None if runtime == runtimes.TORCH else runtimes.load(folder, threads)
    if onnx is not None:
        return Served(version, None, read_meta(folder), reference, onnx)
    from pipeline.training.model import load

    return Served(version, *load(folder), reference)
