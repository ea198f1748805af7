"""Serving targets beside tollgate's own server: MLflow's scoring server, KServe on a cluster, TorchServe.

MLflow and KServe serve the registered MLflow model as is; tollgate only says how (a command, a manifest).
TorchServe gets an archive of its own, registered and verified when one runs (pipeline/torchserve.py)."""

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


def storage_uri(store: Store, params: Params, version: str) -> str:
    """Where a version's files are, as a reader outside MLflow (KServe's storage initializer) names them.
    A tracking server that proxies artifacts hands out `mlflow-artifacts:` URIs, which only MLflow clients
    understand: they are resolved against `mlflow.artifacts_destination` (the server's
    --artifacts-destination), and refused with what to set when that is not given."""
    from urllib.parse import urlparse

    uri = store.location(model_uri(params.registry.model_name, version))
    if not uri.startswith("mlflow-artifacts:"):
        return uri
    destination = params.mlflow.artifacts_destination
    if not destination:
        raise LookupError(
            f"v{version}'s artifacts are at {uri}, behind the tracking server's artifact proxy, which KServe "
            "cannot read: set mlflow.artifacts_destination in params.yaml to the server's "
            "--artifacts-destination (e.g. s3://bucket/mlartifacts)"
        )
    return destination.rstrip("/") + "/" + urlparse(uri).path.lstrip("/")


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
                    "storageUri": storage_uri(store, params, version),
                }
            }
        },
    }


def plan(store: Store, params: Params, target: str, version: str) -> dict:
    """What handing `version` to `target` takes, worked out before anything moves (so a target that cannot
    take it fails a promotion before the alias changes): a manifest, a command, or nothing."""
    import yaml

    if target == "kserve":
        manifest = yaml.safe_dump(kserve_manifest(store, params, version), sort_keys=False)
        return {
            "target": target,
            "manifest": paths.KSERVE_MANIFEST,
            "content": manifest,
            "summary": f"KServe manifest for v{version}: kubectl apply -f {paths.KSERVE_MANIFEST}",
        }
    if target == "mlflow":
        return {
            "target": target,
            "command": mlflow_command(params),
            "summary": f"serve v{version} with MLflow's server: {mlflow_command(params)}",
        }
    return {"target": "local", "summary": "tollgate serve follows @champion (promotion reloads it)"}


def apply(root: Path, planned: dict) -> dict:
    """Carry out a plan; returns what was done, for the promotion report."""
    if "content" in planned:
        write_text(root / planned["manifest"], planned.pop("content"))
    return planned


def torchserve(store: Store, params: Params, root: Path, version: str) -> dict:
    """Build `version`'s archive and configuration; with a TorchServe running, register the version,
    check it predicts like the registry's copy, and make it the default."""
    from pipeline import promote
    from pipeline import torchserve as ts

    smoke_x, expected = promote.smoke_check(store, params, root, version)
    client, _ = ts.stage_version(store, params, root, version, smoke_x, expected)
    return {"target": "torchserve", "summary": ts.make_default(client, params, root, version)}


def deploy(store: Store, params: Params, root: Path, target: str) -> dict:
    """Hand the current @champion to `target`."""
    ref = store.version(params.registry.model_name, CHAMPION)
    if ref is None:
        raise LookupError(f"{params.registry.model_name} has no @champion to deploy")
    if target == "torchserve":
        return torchserve(store, params, root, ref.version)
    return apply(root, plan(store, params, target, ref.version))
