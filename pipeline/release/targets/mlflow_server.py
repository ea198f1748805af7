"""MLflow's own scoring server as a target: it serves the registered model as is, so tollgate says how."""

from __future__ import annotations

from pipeline.registry.store import CHAMPION, alias_uri
from pipeline.release.targets.base import Handover, Target
from pipeline.release.verify import Smoke


class MlflowTarget(Target):
    name = "mlflow"
    title = "MLflow's server"

    def command(self) -> str:
        host, port = self.params.serve.host, self.params.serve.port
        return (
            f'mlflow models serve -m "{alias_uri(self.params.registry.model_name, CHAMPION)}" '
            f"--env-manager local -h {host} -p {port}"
        )

    def stage(self, version: str, smoke: Smoke) -> Handover:
        command = self.command()
        return Handover(
            self.name, version, f"serve v{version} with MLflow's server: {command}", {"command": command}
        )
