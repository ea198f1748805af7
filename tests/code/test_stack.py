"""Team mode's configuration: deploy/compose.yaml runs what `tollgate stack` runs, the team extra installs
consistently, and every deployment renders into a Kubernetes Job that passes the API's schema offline."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from pipeline.stack.services import COMPOSE, client_environment, server_commands, server_environments
from tests.support import ROOT

COMPOSE_FILE = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())


def test_compose_services_run_the_commands_tollgate_stack_runs():
    services = COMPOSE_FILE["services"]
    for name, command in server_commands(COMPOSE).items():
        assert services[name]["command"] == command, name
    for name, env in server_environments(COMPOSE).items():
        assert env.items() <= services[name]["environment"].items(), name
    clients = client_environment(
        f"http://mlflow:{COMPOSE.mlflow_port}", f"http://prefect:{COMPOSE.prefect_port}/api"
    )
    for name in ("worker", "serve"):
        assert clients.items() <= services[name]["environment"].items(), name
    # the tollgate server reads artifacts through MLflow's proxy: it holds no storage credentials
    assert not any(k.startswith("AWS_") for k in services["serve"]["environment"])
    # the databases the servers use exist, with Prefect's extension
    init = (ROOT / "deploy" / "postgres-init.sql").read_text()
    assert "CREATE DATABASE mlflow;" in init and "CREATE DATABASE prefect;" in init and "pg_trgm" in init
    # every port a person reaches is published on loopback only
    for service in services.values():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), port


def test_the_installed_packages_are_consistent():
    # dvc-s3's aiobotocore pins botocore: a boto3 installed separately breaks that, and pip check says so
    proc = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


DEPLOYMENTS = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]


@pytest.mark.parametrize("deployment", DEPLOYMENTS, ids=[d["name"] for d in DEPLOYMENTS])
def test_every_deployment_renders_a_valid_kubernetes_job(deployment):
    """What a Kubernetes work pool created with deploy/k8s-job-template.json submits for a flow run of each
    deployment, rendered by prefect-kubernetes itself, validated against the Kubernetes API's schema
    (strict: an unknown field fails, as `kubectl apply --validate=strict` would)."""
    import asyncio
    import inspect
    import uuid

    import kubernetes_validate
    from prefect.client.schemas.objects import FlowRun
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    template = json.loads((ROOT / "deploy" / "k8s-job-template.json").read_text())
    values = {
        "image": "registry.example.com/tollgate:1.0",
        "env": client_environment("http://mlflow:5000", "http://prefect:4200/api"),
        "namespace": "tollgate",
    }
    with temporary_settings({PREFECT_API_URL: "http://prefect:4200/api"}):
        config = KubernetesWorkerJobConfiguration.from_template_and_values(template, values)
        if inspect.isawaitable(config):
            config = asyncio.run(config)
        run = FlowRun(
            flow_id=uuid.uuid4(),
            name=f"{deployment['name']}-run",
            parameters=deployment.get("parameters", {}),
        )
        config.prepare_for_flow_run(run)
    job = config.job_manifest
    kubernetes_validate.validate(job, kubernetes_validate.latest_version(), strict=True)
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == values["image"] and container["args"] == ["prefect", "flow-run", "execute"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000" and env["PREFECT__FLOW_RUN_ID"] == str(run.id)
