"""A model folder's file names and its metadata, readable without torch: a server answering on ONNX Runtime
reads `model.json` and never loads the weights (pipeline/training/model.py does, with torch)."""

from __future__ import annotations

from pathlib import Path

from pipeline.core.files import load_json

WEIGHTS = "model.pt"
META = "model.json"
# Name of this folder inside a logged MLflow pyfunc model (see pipeline/registry/pyfunc.py).
MLFLOW_ARTIFACT = "model_dir"


def read_meta(folder: str | Path) -> dict:
    """Architecture, input shape, classes and normalisation of the model in `folder`."""
    return load_json(Path(folder) / META)


def backbone_name(meta: dict) -> str:
    # "arch": how model.json named the backbone before timm backbones came (versions already registered)
    return meta.get("backbone") or meta["arch"]
