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
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import psutil
import pytest

from pipeline.core import paths
from pipeline.core.config import load_params
from pipeline.evaluation.verdict import Verdict
from pipeline.stack.services import S3_KEY, S3_SECRET, SERVICES, Stack
from tests.support import (
    Server,
    free_port,
    http,
    make_project,
    run,
    set_param,
    stop_process,
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
    verdict = Verdict.load(a / paths.GATE_REPORT)  # latency only warns, and may on a busy machine
    assert tags["data_version"] == manifest["data_version"] and tags["gate"] == verdict.summary()
    assert verdict.passed
    mlflow_run = _api(stack, "runs/get", run_id=version["run_id"])["run"]
    metrics = {m["key"]: m["value"] for m in mlflow_run["data"]["metrics"]}
    evaluated = json.loads((a / paths.EVAL_METRICS).read_text())
    assert metrics["test_accuracy"] == pytest.approx(evaluated["accuracy"])
    run_tags = {t["key"]: t["value"] for t in mlflow_run["data"]["tags"]}
    assert run_tags["tollgate.data_version"] == manifest["data_version"]
    assert version["source"].startswith("models:/") or version["source"].startswith("mlflow-artifacts:")
    # what a serving replica reads over REST without MLflow's client is what MLflow's client reads
    from pipeline.registry.reader import RestReads
    from pipeline.registry.store import Store

    lean = RestReads(stack.mlflow_url, 30)
    client = Store.at(stack.mlflow_url)  # not the registry an earlier test of this worker connected to
    for alias in ("champion", "challenger", "canary"):
        assert lean.version(NAME, alias) == client.version(NAME, alias), alias
    assert lean.version("no-such-model", "champion") is None
    assert lean.model_tags(NAME) == client.model_tags(NAME) and lean.model_tags("no-such-model") == {}
    uri = f"models:/{NAME}/1"
    assert lean.location(uri) == client.location(uri)
    # the artifacts went through the server's proxy into the bucket
    stored = _bucket(stack, "mlartifacts/")
    assert any(k.endswith("/model.pt") for k in stored) and any(k.endswith("/MLmodel") for k in stored)


def test_a_server_without_storage_credentials_serves_the_champion(stack, origin):
    from pipeline.training.model import load, predict_proba

    a = origin["a"]
    server = Server(a, _env(stack))
    try:
        credentials = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"}
        assert not credentials & set(psutil.Process(server.proc.pid).environ())
        assert not (Path.home() / ".aws" / "credentials").exists()
        assert http("GET", f"{server.url}/v2/models/{NAME}")[1]["versions"] == ["1"]
        model, _ = load(a / paths.MODEL_DIR)
        from pipeline.data.prepared import load_split

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
        # Once it has run this flow, Prefect's process worker never ends the shutdown its SIGTERM starts
        # (its event loop idles on, no child left): stop_process sat out its whole 180 s grace both times
        # it was measured. The run is over and checked by now, so a kill loses nothing; 30 s still covers
        # a clean exit under load.
        stop_process(worker, grace=30)
        log.close()


def test_replicas_share_live_samples_and_feedback_in_the_bucket(stack, origin, clone_b, monkeypatch):
    """Two replicas on two checkouts write their samples to the stack's bucket: feedback for a request
    replica A sampled, posted to replica B, is stored, and `tollgate monitor` judges both replicas'
    samples."""
    from pipeline.data import shards
    from pipeline.data.feedback import feedback_labels

    live, feedback = f"s3://{stack.cfg.bucket}/live", f"s3://{stack.cfg.bucket}/feedback"
    storage = {**_env(stack), **stack.storage_env(), "AWS_ENDPOINT_URL_S3": stack.s3_url}
    token = {"TOLLGATE_FEEDBACK_TOKEN": "label-it"}
    checkouts = (origin["a"], clone_b)
    changed = {"monitor.folder": live, "data.feedback": feedback, "monitor.sample_fraction": 1.0,
               "monitor.flush_s": 0.3}  # fmt: skip
    before = {c: load_params(c / "params.yaml") for c in checkouts}
    for checkout in checkouts:
        for key, value in changed.items():
            set_param(checkout, key, value)
    servers = [Server(checkout, {**storage, **token}) for checkout in checkouts]
    try:
        from pipeline.data.prepared import load_split

        x = np.asarray(load_split(origin["a"] / paths.PREPARED_DIR, "test").x)
        ids = {}
        for server in servers:
            for i in range(150):
                body = json.dumps({"inputs": x[i % len(x)][None].tolist()}).encode()
                status, out = http(
                    "POST", f"{server.url}/invocations", body, {"Content-Type": "application/json"}
                )
                assert status == 200
                ids.setdefault(server.url, []).append(out["request_id"])
        deadline = time.monotonic() + 60
        while len(_bucket(stack, "live/samples-")) < 2:  # a shard from each
            assert time.monotonic() < deadline, _bucket(stack, "live/")
            time.sleep(0.3)
        sampled_by_a = ids[servers[0].url][7]
        payload = json.dumps({"request_id": sampled_by_a, "label": "ring"}).encode()
        headers = {"Authorization": "Bearer label-it", "Content-Type": "application/json"}
        status, out = http("POST", f"{servers[1].url}/feedback", payload, headers)
        assert status == 201, out
        assert out["stored"].startswith(feedback)
    finally:
        for server in servers:
            server.stop()
    try:
        for key, value in {**stack.storage_env(), "AWS_ENDPOINT_URL_S3": stack.s3_url}.items():
            monkeypatch.setenv(key, value)
        assert feedback_labels(shards.open_folder(feedback, origin["a"]))[(sampled_by_a, 0)] == "ring"
        run(["tollgate", "monitor"], cwd=origin["a"], **storage)
        report = json.loads((origin["a"] / "reports" / "monitor.json").read_text())
        assert report["samples"] == 300 and report["folder"] == live  # both replicas' 150
    finally:
        for checkout in checkouts:
            for key in changed:
                section, _, name = key.partition(".")
                set_param(checkout, key, getattr(getattr(before[checkout], section), name))


# --- many machines at once: the promotion guard, fencing -----------------------------------------------


def _until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.2)


def _racer(checkout: Path, cmd: list[str], env: dict, lineup: Path) -> tuple[subprocess.Popen, Path]:
    """`cmd` in `checkout`, pausing when it reaches the alias move with the guard held, until `lineup/go`
    exists; its output goes to a log beside the line-up folder."""
    lineup.mkdir(exist_ok=True)
    log = lineup.parent / f"{lineup.name}-{checkout.name}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd,
            cwd=checkout,
            env={
                **tool_env(checkout),
                **env,
                "TOLLGATE_FAILPOINT": "promote:guarded:pause",
                "TOLLGATE_FAILPOINT_DIR": str(lineup),
            },
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return proc, log


def _paused(lineup: Path) -> list[int]:
    return [int(p.name.removeprefix("paused-")) for p in lineup.glob("paused-*")]


def _others(stack, a: Path, champion: str) -> list[str]:
    """Two registered versions other than the champion, newest first (registering more when needed)."""
    while len(_versions(stack)) < 3:
        _candidate(a, _env(stack))
        run(["tollgate", "register"], cwd=a, **_env(stack))
    found = sorted((int(v["version"]) for v in _versions(stack)), reverse=True)
    return [str(v) for v in found if str(v) != champion][:2]


def _pulled(b: Path) -> None:
    """Checkout B with the shared data, whichever tests ran before."""
    for key, value in (("access_key_id", S3_KEY), ("secret_access_key", S3_SECRET)):
        run(["dvc", "remote", "modify", "--local", "team", key, value], cwd=b)
    run(["tollgate", "data", "pull"], cwd=b)


def test_two_flows_from_two_checkouts_overlapping_at_the_alias_move_promote_in_turn(
    stack, origin, clone_b, tmp_path
):
    """Both candidates were gated against the same champion; the guard lets one move the alias at a time,
    and the one that moves second finds @champion moved, is fenced, and its flow evaluates it again."""
    a, b = origin["a"], clone_b
    _pulled(b)
    before = _alias(stack, "champion")
    lineup = tmp_path / "flows"
    racers = {}
    for checkout, epochs in ((a, 12), (b, 13)):  # a new candidate in each checkout
        set_param(checkout, "train.epochs", epochs)
        # absolute bounds decide: both pass, also when re-gated (the comparisons only warn)
        set_param(checkout, "gate.max_drop", 1.0)
        set_param(checkout, "gate.warn_only", ["max_p99_latency_ms", "significance"])
        racers[checkout] = _racer(checkout, ["tollgate", "flow"], _env(stack), lineup)
    try:
        logs = [log for _, log in racers.values()]
        _until(lambda: _paused(lineup), 600, "a promotion inside the guard")
        _until(lambda: all("promotion guard: taking" in log.read_text() for log in logs), 600, "both guards")
        time.sleep(3)  # the other one is waiting for the guard, not past it
        assert len(_paused(lineup)) == 1
        (lineup / "go").touch()
        for proc, _ in racers.values():
            proc.wait(timeout=600)
    finally:
        for proc, _ in racers.values():  # whatever happened, no racer outlives the test
            if proc.poll() is None:
                proc.kill()
        for checkout in (a, b):
            set_param(checkout, "train.epochs", 14)
            set_param(checkout, "gate.max_drop", 0.01)
            set_param(checkout, "gate.warn_only", ["max_p99_latency_ms"])
    promoted = {c: json.loads((c / paths.PROMOTION).read_text()) for c in (a, b)}
    first = next(c for c in (a, b) if promoted[c].get("previous") == before and promoted[c]["promoted"])
    second = b if first == a else a
    won = promoted[first]["version"]
    loser_log = racers[second][1].read_text()
    assert f"champion moved from v{before} to v{won} since evaluation; re-run evaluate" in loser_log
    assert "evaluating again against the new champion, once" in loser_log
    gate = json.loads((second / paths.GATE_REPORT).read_text())
    assert gate["champion_version"] == won  # re-gated against the new champion
    assert promoted[second]["promoted"] and promoted[second]["previous"] == won
    assert _alias(stack, "champion") == promoted[second]["version"] and _alias(stack, "previous") == won


def _race(checkouts: list[Path], targets: list[str], env: dict, lineup: Path):
    """Two rollbacks lined up at the alias move, then let go: (their outputs, the pids that were inside
    the guard together, their pids)."""
    racers = [
        _racer(c, ["tollgate", "rollback", "--to", t], env, lineup)
        for c, t in zip(checkouts, targets, strict=True)
    ]
    _until(lambda: all("promotion guard: taking" in log.read_text() for _, log in racers), 120, "both")
    _until(lambda: _paused(lineup), 120, "a rollback inside the guard")
    time.sleep(3)
    inside = _paused(lineup)
    (lineup / "go").touch()
    for proc, _ in racers:
        proc.wait(timeout=120)
    return [log.read_text() for _, log in racers], inside, [proc.pid for proc, _ in racers]


def test_the_guard_serialises_racing_rollbacks_and_without_it_an_update_is_lost(
    stack, origin, clone_b, tmp_path
):
    a, b = origin["a"], clone_b
    _pulled(b)
    champion = _alias(stack, "champion")
    x, y = _others(stack, a, champion)

    # Negative control: each checkout's own lock file only. Both get inside, both read @champion before
    # either moves it, and @previous ends on the version from before both, skipping the one in between.
    for checkout in (a, b):
        set_param(checkout, "registry.guard", "file")
    try:
        outs, inside, _ = _race([a, b], [x, y], _env(stack), tmp_path / "unguarded")
    finally:
        for checkout in (a, b):
            set_param(checkout, "registry.guard", "auto")
    assert len(inside) == 2, outs  # both inside at once; each read @champion before either moved it
    assert all("registry.guard is file but the registry" in out for out in outs)
    assert _alias(stack, "champion") in (x, y) and _alias(stack, "previous") == champion  # the lost update

    # With the guard (a Prefect global concurrency limit): one at a time, @previous always the version
    # that was champion just before.
    start = _alias(stack, "champion")
    outs, inside, pids = _race([a, b], [champion, x if start == y else y], _env(stack), tmp_path / "g")
    assert len(inside) == 1, outs
    first = pids.index(inside[0])
    targets = [champion, x if start == y else y]
    assert _alias(stack, "champion") == targets[1 - first] and _alias(stack, "previous") == targets[first]
    assert f"(was v{start})" in outs[first] and f"(was v{targets[first]})" in outs[1 - first]

    # A shared registry with no shared guard: refused, saying what to configure.
    no_prefect = {"MLFLOW_TRACKING_URI": stack.mlflow_url, "PREFECT_API_URL": ""}
    proc = run(["tollgate", "rollback", "--to", x], cwd=a, check=False, **no_prefect)
    assert proc.returncode == 1 and "nothing guards promotions across machines" in proc.stderr
    assert "set PREFECT_API_URL" in proc.stderr and _alias(stack, "champion") == targets[1 - first]


def test_a_killed_guard_holder_frees_the_guard_when_its_lease_runs_out(stack, origin, clone_b, tmp_path):
    a, b = origin["a"], clone_b
    _pulled(b)
    champion = _alias(stack, "champion")
    x, y = _others(stack, a, champion)
    lease = load_params(a / paths.PARAMS).registry.guard_lease_s  # 60 s, Prefect's shortest
    lineup = tmp_path / "lease"
    holder, _ = _racer(a, ["tollgate", "rollback", "--to", x], _env(stack), lineup)
    _until(lambda: _paused(lineup), 120, "the holder inside the guard")
    waiter, log = _racer(b, ["tollgate", "rollback", "--to", y], _env(stack), tmp_path / "waiter")
    _until(lambda: "promotion guard: taking" in log.read_text(), 120, "the waiter at the guard")
    holder.kill()  # SIGKILL while holding the guard: the holder releases nothing
    killed = time.monotonic()
    holder.wait()
    (tmp_path / "waiter" / "go").touch()
    assert waiter.wait(timeout=lease + 180) == 0, log.read_text()
    waited = time.monotonic() - killed
    # The lease, Prefect's 2 s reclaim loop and retries, and a busy machine's margin: well short of the
    # guard's own timeout (600 s), after which the waiter would fail instead.
    assert waited < lease + 120, waited
    assert _alias(stack, "champion") == y and _alias(stack, "previous") == champion
    assert not (a / paths.PROMOTION_INTENT).exists()  # killed before it moved anything


def test_a_postgresql_registry_is_guarded_by_an_advisory_lock_a_killed_holder_frees_at_once(stack, origin):
    a = origin["a"]
    registry = stack.topology.database("mlflow", "psycopg2")
    hold = (
        "import sys, time\n"
        "from pipeline.release import guard\n"
        "from pipeline.core.config import load_params\n"
        "with guard.held(load_params('params.yaml'), sys.argv[1]):\n"
        "    print('HELD', flush=True)\n"
        "    time.sleep(120)\n"
    )
    env = {**tool_env(a), "PREFECT_API_URL": ""}

    def holder() -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-c", hold, registry],
            cwd=a,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    first, second = holder(), None
    try:
        assert "PostgreSQL advisory lock" in first.stdout.readline()
        assert "held after" in first.stdout.readline() and first.stdout.readline().strip() == "HELD"
        second = holder()
        second.stdout.readline()
        assert "waiting for another promotion (PostgreSQL advisory lock)" in second.stdout.readline()
        first.kill()
        start = time.monotonic()
        assert "held after" in second.stdout.readline()
        # The database dropped the dead session's lock: not a lease running out (60 s)
        assert time.monotonic() - start < 30
    finally:
        for proc in (first, second):
            if proc is not None:
                proc.kill()
                proc.wait()


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
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if line.startswith("[tollgate] epoch 3/"):
                _kill(stack, "mlflow")
            if "the tracking server did not take epoch" in line:
                break  # down past a request's retries: training went on, its metrics wait for the server
        _up(stack)
        out = "".join(seen) + proc.communicate(timeout=600)[0]
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
    # mlflow.http_retries' ~30 s of backoff plus the stage's start, with a busy machine's margin: MLflow's
    # own default retries (7, doubling from 2 s) would wait 254 s before failing
    assert elapsed < 180, elapsed
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
        proc = run(["tollgate", "data", "push"], cwd=a, check=False)
    finally:
        local.write_bytes(kept)
    assert proc.returncode == 1 and "DVC remote 'team'" in proc.stderr and "no credentials" in proc.stderr
    assert "dvc push with" not in proc.stdout  # refused before DVC (and its retries) ever started


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
        push = run(["tollgate", "data", "push"], cwd=a, check=False)
        assert push.returncode == 1 and "DVC remote 'team'" in push.stderr and "cannot be used" in push.stderr
        assert "dvc push with" not in push.stdout  # one probe of the endpoint, not DVC's retries
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
