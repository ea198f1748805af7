"""KServe as a target: an InferenceService manifest for KServe's MLflow runtime (MLServer, Open Inference
Protocol v2) pointing at the version's artifacts, written for people (or their GitOps) to apply."""

from __future__ import annotations

import re

from pipeline.core import paths
from pipeline.core.files import write_text
from pipeline.registry.store import model_uri
from pipeline.release.targets.base import Handover, Target, TargetError
from pipeline.release.verify import Smoke


class KServeTarget(Target):
    name = "kserve"
    title = "KServe"

    def storage_uri(self, version: str) -> str:
        """Where a version's files are, as a reader outside MLflow (KServe's storage initializer) names
        them. A tracking server that proxies artifacts hands out `mlflow-artifacts:` URIs, which only MLflow
        clients understand: they are resolved against `mlflow.artifacts_destination` (the server's
        --artifacts-destination), and refused with what to set when that is not given."""
        from urllib.parse import urlparse

        uri = self.store.location(model_uri(self.params.registry.model_name, version))
        if not uri.startswith("mlflow-artifacts:"):
            return uri
        destination = self.params.mlflow.artifacts_destination
        if not destination:
            raise TargetError(
                f"v{version}'s artifacts are at {uri}, behind the tracking server's artifact proxy, which "
                "KServe cannot read: set mlflow.artifacts_destination in params.yaml to the server's "
                "--artifacts-destination (e.g. s3://bucket/mlartifacts)"
            )
        return destination.rstrip("/") + "/" + urlparse(uri).path.lstrip("/")

    def manifest(self, version: str) -> dict:
        name = self.params.registry.model_name
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
                        "storageUri": self.storage_uri(version),
                    }
                }
            },
        }

    def stage(self, version: str, smoke: Smoke) -> Handover:
        """The manifest, worked out before anything moves: a version KServe cannot read fails here."""
        import yaml

        return Handover(
            self.name,
            version,
            f"KServe manifest for v{version}: kubectl apply -f {paths.KSERVE_MANIFEST}",
            {"manifest": paths.KSERVE_MANIFEST},
            {"content": yaml.safe_dump(self.manifest(version), sort_keys=False)},
        )

    def commit(self, handover: Handover) -> Handover:
        write_text(self.root / paths.KSERVE_MANIFEST, handover.held["content"])
        return handover
