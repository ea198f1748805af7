"""Serving targets beside tollgate's own server: MLflow's scoring server and KServe on a cluster.

Both serve the registered MLflow model as is; tollgate only says how (a command, a manifest)."""

from __future__ import annotations

import re
from pathlib import Path

from pipeline import paths
from pipeline.config import Params
from pipeline.files import write_text
from pipeline.tracking import CHAMPION, Store, alias_uri, model_uri


def mlflow_command(params: Params) -> str:
    return (
        f'mlflow models serve -m "{alias_uri(params.registry.model_name, CHAMPION)}" --env-manager local '
        f"-h {params.serve.host} -p {params.serve.port}"
    )


def kserve_manifest(store: Store, params: Params, version: str) -> dict:
    """An InferenceService for KServe's MLflow runtime (MLServer, Open Inference Protocol v2), pointing at the
    version's artifacts in the tracking server's artifact store."""
    name = params.registry.model_name
    return {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {
            "name": re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-"),  # a DNS-1123 label
            "labels": {"tollgate/model-version": str(version)},
            "annotations": {"tollgate/model-uri": model_uri(name, version)},
        },
        "spec": {
            "predictor": {
                "model": {
                    "modelFormat": {"name": "mlflow"},
                    "protocolVersion": "v2",
                    "storageUri": store.location(model_uri(name, version)),
                }
            }
        },
    }


def deploy(store: Store, params: Params, root: Path, target: str) -> dict:
    """Hand the current @champion to `target`; returns what was done, for the promotion report."""
    import yaml

    ref = store.version(params.registry.model_name, CHAMPION)
    if ref is None:
        raise LookupError(f"{params.registry.model_name} has no @champion to deploy")
    if target == "kserve":
        write_text(
            root / paths.KSERVE_MANIFEST,
            yaml.safe_dump(kserve_manifest(store, params, ref.version), sort_keys=False),
        )
        return {
            "target": target,
            "manifest": paths.KSERVE_MANIFEST,
            "summary": f"KServe manifest for v{ref.version}: kubectl apply -f {paths.KSERVE_MANIFEST}",
        }
    if target == "mlflow":
        return {
            "target": target,
            "command": mlflow_command(params),
            "summary": f"serve v{ref.version} with MLflow's server: {mlflow_command(params)}",
        }
    return {"target": "local", "summary": "tollgate serve follows @champion (promotion reloads it)"}
