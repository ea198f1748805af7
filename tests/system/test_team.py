"""Team mode against real shared services started by `tollgate stack up` (PostgreSQL, an S3 endpoint, an
MLflow tracking server on PostgreSQL proxying artifacts to S3, a Prefect server on PostgreSQL), all on
127.0.0.1: two checkouts of one git repository sharing data through a DVC S3 remote, a registry read back
through MLflow's REST API, a server without storage credentials, a Prefect worker in an empty directory,
and the faults a shared service brings. `pytest -m team` selects these."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import psutil
import pytest

from pipeline import paths
from pipeline.config import load_params
from pipeline.stack import S3_KEY, S3_SECRET, SERVICES, Stack
from tests.support import (
    Server,
    free_port,
    http,
    make_project,
    run,
    set_param,
    tool_env,
    write_image,
    write_image_folder,
)

pytestmark = [pytest.mark.slow, pytest.mark.team]
NAME = "tollgate-classifier"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """The team's services, on free ports, with their state in a folder of their own."""
    home = make_project(tmp_path_factory.mktemp("team") / "stack-home")
    for key in ("postgres_port", "s3_port", "mlflow_port", "prefect_port"):
        set_param(home, f"stack.{key}", free_port())
    run(["tollgate", "stack", "up"], cwd=home)
    stack = Stack.of(load_params(home / "params.yaml").stack, home)
    yield stack
    run(["tollgate", "stack", "down", "--purge"], cwd=home, check=False)


def _env(stack) -> dict[str, str]:
    """A checkout's environment in team mode: two URLs, no storage credentials."""
    return stack.client_env()


def _git(cwd: Path, *args: str) -> str:
    git = ["git", "-c", "user.email=test@tollgate", "-c", "user.name=test"]
    return subprocess.run([*git, *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


def _dvc_remote(checkout: Path, stack, credentials: bool = True) -> None:
    run(["dvc", "remote", "add", "-d", "-f", "team", f"s3://{stack.cfg.bucket}/dvc"], cwd=checkout)
    run(["dvc", "remote", "modify", "team", "endpointurl", stack.s3_url], cwd=checkout)
    if credentials:  # DVC's own, in the checkout's untracked config.local: never in a stage's environment
        run(["dvc", "remote", "modify", "--local", "team", "access_key_id", S3_KEY], cwd=checkout)
        run(["dvc", "remote", "modify", "--local", "team", "secret_access_key", S3_SECRET], cwd=checkout)


@pytest.fixture(scope="module")
def origin(stack, tmp_path_factory) -> dict:
    """Checkout A: the user's images versioned with `dvc add`, the pipeline run on the team stack, data and
    outputs pushed to the DVC remote, the commit pushed to a shared git repository."""
    base = tmp_path_factory.mktemp("git")
    a = make_project(base / "a")
    write_image_folder(a / "data" / "raw", per_class=24)
    for key, value in (
        ("data.source", "imagefolder"),
        ("data.image_size", [16, 16]),
        ("data.channels", 3),
        ("train.batch_size", 8),
    ):
        set_param(a, key, value)
    _git(a, "rm", "-r", "-q", "--cached", "data/raw")  # DVC versions the folder from now on, not git
    run(["dvc", "add", "data/raw"], cwd=a)
    _dvc_remote(a, stack)
    _git(a, "add", "-A")
    _git(a, "commit", "-q", "-m", "team mode: data/raw in DVC, remote in the bucket")
    out = run(["dvc", "repro"], cwd=a, **_env(stack)).stdout
    _git(a, "add", "-A")
    _git(a, "commit", "-q", "-m", "pipeline outputs")
    run(["tollgate", "data", "push"], cwd=a)
    bare = base / "origin.git"
    _git(base, "init", "-q", "--bare", str(bare))
    _git(a, "remote", "add", "origin", str(bare))
    _git(a, "push", "-q", "-u", "origin", "HEAD")
    return {"a": a, "bare": bare, "repro": out}


def _api(stack, path: str, **query) -> dict:
    url = f"{stack.mlflow_url}/api/2.0/mlflow/{path}?{urllib.parse.urlencode(query)}"
    with urllib.request.urlopen(url, timeout=30) as resp:
        return json.loads(resp.read())


def _versions(stack) -> list[dict]:
    return _api(stack, "model-versions/search", filter=f"name='{NAME}'")["model_versions"]


def _alias(stack, alias: str) -> str | None:
    aliases = _api(stack, "registered-models/get", name=NAME)["registered_model"].get("aliases", [])
    return next((a["version"] for a in aliases if a["alias"] == alias), None)


def _bucket(stack, prefix: str) -> list[str]:
    import boto3

    s3 = boto3.client(
        "s3",
        endpoint_url=stack.s3_url,
        aws_access_key_id=S3_KEY,
        aws_secret_access_key=S3_SECRET,
        region_name="us-east-1",
    )
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=stack.cfg.bucket, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def test_the_pipeline_runs_on_shared_services_and_the_registry_reads_back_over_rest(stack, origin):
    assert "Running stage 'promote'" in origin["repro"]
    a = origin["a"]
    (version,) = _versions(stack)
    assert (
        version["version"] == "1" and _alias(stack, "champion") == "1" and _alias(stack, "challenger") == "1"
    )
    tags = {t["key"]: t["value"] for t in version["tags"]}
    manifest = json.loads((a / paths.PREPARED_DIR / "manifest.json").read_text())
    assert tags["data_version"] == manifest["data_version"] and tags["gate"] == "passed"
    mlflow_run = _api(stack, "runs/get", run_id=version["run_id"])["run"]
    metrics = {m["key"]: m["value"] for m in mlflow_run["data"]["metrics"]}
    evaluated = json.loads((a / paths.EVAL_METRICS).read_text())
    assert metrics["test_accuracy"] == pytest.approx(evaluated["accuracy"])
    run_tags = {t["key"]: t["value"] for t in mlflow_run["data"]["tags"]}
    assert run_tags["tollgate.data_version"] == manifest["data_version"]
    assert version["source"].startswith("models:/") or version["source"].startswith("mlflow-artifacts:")
    # the artifacts went through the server's proxy into the bucket
    stored = _bucket(stack, "mlartifacts/")
    assert any(k.endswith("/model.pt") for k in stored) and any(k.endswith("/MLmodel") for k in stored)


def test_a_server_without_storage_credentials_serves_the_champion(stack, origin):
    from pipeline.model import load, predict_proba

    a = origin["a"]
    server = Server(a, _env(stack))
    try:
        credentials = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"}
        assert not credentials & set(psutil.Process(server.proc.pid).environ())
        assert not (Path.home() / ".aws" / "credentials").exists()
        assert http("GET", f"{server.url}/v2/models/{NAME}")[1]["versions"] == ["1"]
        model, _ = load(a / paths.MODEL_DIR)
        from pipeline.data import load_split

        test = load_split(a / paths.PREPARED_DIR, "test")
        body = json.dumps({"inputs": np.asarray(test.x[:12]).tolist()}).encode()
        status, out = http("POST", f"{server.url}/invocations", body, {"Content-Type": "application/json"})
        assert status == 200
        assert (
            np.asarray(out["predictions"]).argmax(1).tolist()
            == predict_proba(model, test.x[:12]).argmax(1).tolist()
        )
    finally:
        server.stop()


def test_the_kserve_manifest_points_at_the_bucket_and_is_a_valid_resource(stack, origin):
    import kubernetes_validate
    import yaml

    a = origin["a"]
    proc = run(["tollgate", "deploy", "--target", "kserve"], cwd=a, check=False, **_env(stack))
    assert (
        proc.returncode == 1 and "set mlflow.artifacts_destination" in proc.stderr
    )  # mlflow-artifacts:/ refused
    destination = f"s3://{stack.cfg.bucket}/mlartifacts"
    set_param(a, "mlflow.artifacts_destination", destination)
    try:
        run(["tollgate", "deploy", "--target", "kserve"], cwd=a, **_env(stack))
    finally:
        set_param(a, "mlflow.artifacts_destination", "")
    manifest = yaml.safe_load((a / paths.KSERVE_MANIFEST).read_text())
    storage = manifest["spec"]["predictor"]["model"]["storageUri"]
    assert storage.startswith(destination + "/")
    # the model's files are really there, where KServe's storage initializer will look
    assert f"{storage.removeprefix(f's3://{stack.cfg.bucket}/')}/MLmodel" in _bucket(stack, "mlartifacts/")
    # InferenceService is a custom resource, whose schema is not offline: its metadata is checked as the API
    # checks any object's (strict ObjectMeta, within a resource it knows), its spec field by field
    holder = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": manifest["metadata"]}
    kubernetes_validate.validate(holder, kubernetes_validate.latest_version(), strict=True)
    assert manifest["apiVersion"] == "serving.kserve.io/v1beta1" and manifest["kind"] == "InferenceService"
    model = manifest["spec"]["predictor"]["model"]
    assert model["modelFormat"] == {"name": "mlflow"} and model["protocolVersion"] == "v2"


@pytest.fixture(scope="module")
def clone_b(origin, tmp_path_factory) -> Path:
    """Checkout B: a fresh clone elsewhere, with DVC credentials of its own."""
    b = tmp_path_factory.mktemp("b") / "b"
    _git(b.parent, "clone", "-q", str(origin["bare"]), str(b))
    return b


def test_a_fresh_clone_pulls_the_data_and_has_nothing_to_run(stack, clone_b):
    for key, value in (("access_key_id", S3_KEY), ("secret_access_key", S3_SECRET)):
        run(["dvc", "remote", "modify", "--local", "team", key, value], cwd=clone_b)
    run(["tollgate", "data", "pull"], cwd=clone_b)
    assert len(list((clone_b / "data" / "raw").rglob("*.png"))) == 72
    out = run(["dvc", "repro"], cwd=clone_b, **_env(stack)).stdout
    assert "Running stage" not in out and "Data and pipelines are up to date" in out
    assert len(_versions(stack)) == 1


def test_a_new_image_pushed_from_one_checkout_retrains_in_the_other(stack, origin, clone_b):
    a = origin["a"]
    versions = len(_versions(stack))
    write_image(a / "data" / "raw" / "ring" / "new.png", "ring", (40, 30), "RGB", 4242)
    run(["dvc", "add", "data/raw"], cwd=a)
    _git(a, "commit", "-q", "-am", "one more ring")
    run(["tollgate", "data", "push"], cwd=a)
    _git(a, "push", "-q", "origin", "HEAD")
    _git(clone_b, "pull", "-q")
    for key, value in (("access_key_id", S3_KEY), ("secret_access_key", S3_SECRET)):
        run(["dvc", "remote", "modify", "--local", "team", key, value], cwd=clone_b)
    run(["tollgate", "data", "pull"], cwd=clone_b)
    assert (clone_b / "data" / "raw" / "ring" / "new.png").exists()
    out = run(["dvc", "repro"], cwd=clone_b, **_env(stack)).stdout
    assert "Running stage 'prepare'" in out and "Running stage 'train'" in out
    new = json.loads((clone_b / paths.PREPARED_DIR / "manifest.json").read_text())["data_version"]
    assert len(_versions(stack)) == versions + 1
    latest = max(_versions(stack), key=lambda v: int(v["version"]))
    assert {t["key"]: t["value"] for t in latest["tags"]}["data_version"] == new


def test_a_worker_in_an_empty_directory_runs_the_team_deployment_to_a_new_champion(stack, origin, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    a = origin["a"]
    _git(a, "pull", "-q", "--rebase")
    set_param(a, "train.epochs", 14)  # committed, not run: the worker's run has something to do
    _git(a, "commit", "-q", "-am", "train longer")
    _git(a, "push", "-q", "origin", "HEAD")
    env = {**_env(stack), "TOLLGATE_GIT_URL": str(origin["bare"]), "PWD": str(a)}
    run(["prefect", "work-pool", "create", "tollgate-team", "--type", "process"], cwd=a, check=False, **env)
    run(["prefect", "--no-prompt", "deploy", "--name", "nightly-retrain-team"], cwd=a, **env)
    workdir = tmp_path / "worker"
    workdir.mkdir()
    worker_env = {
        **tool_env(),
        **_env(stack),
        "AWS_ACCESS_KEY_ID": S3_KEY,
        "AWS_SECRET_ACCESS_KEY": S3_SECRET,
        "PREFECT_WORKER_QUERY_SECONDS": "2",
    }
    log = open(tmp_path / "worker.log", "w")  # noqa: SIM115 - closed below
    worker = subprocess.Popen(
        ["prefect", "worker", "start", "--pool", "tollgate-team", "--type", "process"],
        cwd=workdir,
        env=worker_env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        with temporary_settings({PREFECT_API_URL: stack.prefect_url}):
            flow_run = run_deployment("training-pipeline/nightly-retrain-team", timeout=600)
            with get_client(sync_client=True) as client:
                deployment = client.read_deployment(flow_run.deployment_id)
        assert flow_run.state.is_completed(), (tmp_path / "worker.log").read_text()[-3000:]
        assert flow_run.state.message.startswith("promoted v"), flow_run.state.message
        version = flow_run.state.message.split()[1].removeprefix("v")
        assert _alias(stack, "champion") == version
        clone = deployment.pull_steps[0]["prefect.deployments.steps.git_clone"]
        assert clone["repository"] == str(origin["bare"])  # resolved at deploy time
    finally:
        worker.terminate()
        worker.wait(timeout=60)
        log.close()


def _kill(stack, service: str) -> None:
    proc = stack.processes()[service]
    os.killpg(proc["pid"], signal.SIGKILL)
    psutil.wait_procs([psutil.Process(proc["pid"])], timeout=10)


def _up(stack) -> None:
    run(["tollgate", "stack", "up"], cwd=stack.folder.parent.parent)


def test_a_tracking_server_restarted_mid_training_keeps_one_run_with_every_epoch(stack, origin):
    a = origin["a"]
    set_param(a, "train.epochs", 20)
    try:
        proc = subprocess.Popen(
            ["tollgate", "train"],
            cwd=a,
            env={**tool_env(a), **_env(stack)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for line in proc.stdout:
            if line.startswith("[tollgate] epoch 3/"):
                _kill(stack, "mlflow")
                time.sleep(3)  # training goes on; its next metrics wait for the server
                _up(stack)
                break
        out = line + proc.communicate(timeout=300)[0]
        assert proc.returncode == 0, out
    finally:
        set_param(a, "train.epochs", 14)
    report = json.loads((a / paths.TRAIN_REPORT).read_text())
    history = _api(stack, "metrics/get-history", run_id=report["run_id"], metric_key="val_loss")["metrics"]
    assert sorted(m["step"] for m in history) == list(range(1, 21))  # every epoch, once
    assert _api(stack, "runs/get", run_id=report["run_id"])["run"]["info"]["status"] == "FINISHED"


def test_a_dead_tracking_server_fails_the_stage_within_a_minute_and_moves_nothing(stack, origin):
    a = origin["a"]
    before, champion = len(_versions(stack)), _alias(stack, "champion")
    _kill(stack, "mlflow")
    try:
        start = time.monotonic()
        proc = run(["tollgate", "register"], cwd=a, check=False, **_env(stack))
        elapsed = time.monotonic() - start
    finally:
        _up(stack)
    assert proc.returncode == 1
    assert f"the MLflow tracking server ({stack.mlflow_url}) failed" in proc.stderr
    assert elapsed < 75, elapsed  # MLflow's own default retries would take about four minutes
    assert len(_versions(stack)) == before and _alias(stack, "champion") == champion


def _candidate(a: Path, env: dict) -> None:
    """A new training run that passes the gate, ready for register."""
    for stage in ("train", "evaluate"):
        run(["tollgate", stage], cwd=a, **env)
    assert json.loads((a / paths.GATE_REPORT).read_text())["passed"]


@pytest.mark.parametrize("point", ["register:logged", "register:version-created"])
def test_registration_interrupted_by_the_server_is_completed_by_running_it_again(stack, origin, point):
    """The tracking server dies after the model is logged, before (or just after) the version is created:
    running register again leaves exactly one version for the run, with every tag and @challenger."""
    a = origin["a"]
    env = _env(stack)
    _candidate(a, env)
    run_id = json.loads((a / paths.GATE_REPORT).read_text())["run_id"]
    register = subprocess.Popen(
        ["tollgate", "register"],
        cwd=a,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={
            **tool_env(a),
            **env,
            "TOLLGATE_FAILPOINT": f"{point}:stop",
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        },
    )
    deadline = time.monotonic() + 180
    while psutil.Process(register.pid).status() != psutil.STATUS_STOPPED:
        assert register.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)
    _kill(stack, "mlflow")
    register.send_signal(signal.SIGCONT)
    register.communicate(timeout=120)
    assert register.returncode != 0
    _up(stack)
    half = [v for v in _versions(stack) if v["run_id"] == run_id]
    assert len(half) == (1 if point == "register:version-created" else 0)
    assert not half or "data_version" not in {t["key"] for t in half[0].get("tags", [])}
    run(["tollgate", "register"], cwd=a, **env)
    done = [v for v in _versions(stack) if v["run_id"] == run_id]
    assert len(done) == 1 and (not half or done[0]["version"] == half[0]["version"])
    tags = {t["key"] for t in done[0]["tags"]}
    assert {"data_version", "git_commit", "params_hash", "gate", "infra_validation", "accuracy"} <= tags
    assert _alias(stack, "challenger") == done[0]["version"]


def test_dvc_without_credentials_fails_at_once_naming_the_remote(stack, origin, tmp_path):
    a = origin["a"]
    local = a / ".dvc" / "config.local"
    kept = local.read_bytes()
    local.unlink()
    try:
        start = time.monotonic()
        proc = run(["tollgate", "data", "push"], cwd=a, check=False)
        assert time.monotonic() - start < 15
    finally:
        local.write_bytes(kept)
    assert proc.returncode == 1 and "DVC remote 'team'" in proc.stderr and "no credentials" in proc.stderr


def test_the_s3_endpoint_down_registers_nothing_and_dvc_fails_fast(stack, origin):
    """Last: the S3 stand-in keeps objects in memory, so its restart loses the bucket's contents."""
    a = origin["a"]
    env = _env(stack)
    _candidate(a, env)
    run_id = json.loads((a / paths.GATE_REPORT).read_text())["run_id"]
    before = len(_versions(stack))
    _kill(stack, "s3")
    try:
        proc = run(["tollgate", "register"], cwd=a, check=False, MLFLOW_HTTP_REQUEST_MAX_RETRIES="1", **env)
        assert (
            proc.returncode == 1 and f"the MLflow tracking server ({stack.mlflow_url}) failed" in proc.stderr
        )
        assert len(_versions(stack)) == before and not [v for v in _versions(stack) if v["run_id"] == run_id]
        start = time.monotonic()
        push = run(["tollgate", "data", "push"], cwd=a, check=False)
        assert time.monotonic() - start < 15
        assert push.returncode == 1 and "DVC remote 'team'" in push.stderr and "cannot be used" in push.stderr
    finally:
        _up(stack)


def test_down_stops_every_process_and_frees_every_port(stack):
    home = stack.folder.parent.parent
    pids = [p["pid"] for p in stack.processes().values()]
    ports = [stack.cfg.postgres_port, stack.cfg.s3_port, stack.cfg.mlflow_port, stack.cfg.prefect_port]
    assert set(stack.processes()) == set(SERVICES) and all(psutil.pid_exists(p) for p in pids)
    run(["tollgate", "stack", "down"], cwd=home)
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids)
    listening = {c.laddr.port for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN}
    assert not listening & set(ports)
    leftovers = [
        p for p in psutil.process_iter(["cmdline"]) if str(stack.folder) in " ".join(p.info["cmdline"] or [])
    ]
    assert not leftovers
