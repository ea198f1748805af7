"""Canary rollouts (`promote.strategy: canary`) on a real `tollgate serve` with real traffic on 127.0.0.1:
clients send labelled test images, a labeller posts `/feedback` for each answer, and `tollgate promote`
drives the steps. A candidate whose labels for two classes are swapped is rolled back by the label test; one
that fails 5 % of its requests by the error threshold at the first step; an equal one survives its driver's
kill -9 and `tollgate promote --resume` makes it champion."""

from __future__ import annotations

import signal
import subprocess
import tempfile
import threading
import uuid
from pathlib import Path

import numpy as np
import orjson
import pytest

from pipeline.core import paths
from pipeline.core.config import load_params
from pipeline.data.prepared import load_split
from tests.support import Server, champion_back, http, http_text, model_client, run, set_param, tool_env

pytestmark = pytest.mark.slow
NAME = "tollgate-classifier"
TOKENS = {"TOLLGATE_ADMIN_TOKEN": "admin-canary", "TOLLGATE_FEEDBACK_TOKEN": "label-canary"}
JSON = {"Content-Type": "application/json"}
# 150 labelled answers a variant: with 3 and 8 swapped (about a fifth of the digits) Fisher's test at the
# step's alpha (0.05 / 6) finds the candidate worse in 99.9 % of simulated windows; 50 labels found it in 66 %
CANARY = {"steps": [50.0, 100.0], "min_requests": 150, "min_s": 1.0, "max_s": 300.0, "min_labels": 20}


@pytest.fixture(scope="module")
def project(two_versions):
    before = (two_versions / paths.PARAMS).read_text()
    set_param(two_versions, "promote.strategy", "canary")
    for key, value in CANARY.items():
        set_param(two_versions, f"promote.canary.{key}", value)
    set_param(two_versions, "serve.follow_interval_s", 1.0)
    set_param(two_versions, "monitor.sample_fraction", 1.0)
    yield two_versions
    (two_versions / paths.PARAMS).write_text(before)


def _alias(project, alias) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(model_client(project).get_model_version_by_alias(NAME, alias).version)
    except MlflowException:
        return None


def _register(project: Path, change=None) -> str:
    """A new version with v2's weights, after `change(model)`; its tags say its gate passed."""
    from pipeline.registry import versions
    from pipeline.registry.store import connect
    from pipeline.training import model as model_io

    store = connect(load_params(project / paths.PARAMS), project)
    model, meta = store.load_model(f"models:/{NAME}/2")
    if change is not None:
        change(model)
    run_id = store.client.create_run(store.experiment_id).info.run_id
    example = np.asarray(load_split(project / paths.PREPARED_DIR, "test").x[:2])
    with tempfile.TemporaryDirectory() as tmp:
        model_io.save(model, meta, tmp)
        version = versions.register(versions.log_candidate(store, run_id, Path(tmp), example), NAME)
    for key, value in store.version_tags(NAME, "2").items():
        store.tag_version(NAME, version, key, value)
    return version


def _swap_two_classes(model) -> None:
    """As if trained with the labels of 3 and 8 swapped: the last layer's rows for them trade places."""
    import torch

    from pipeline.training.model import last_linear

    last = last_linear(model)
    with torch.no_grad():
        for tensor in (last.weight, last.bias):
            tensor[[3, 8]] = tensor[[8, 3]].clone()


class Traffic:
    """Clients on threads: test images to /invocations with a routing key each, feedback for every answer;
    every status is kept."""

    def __init__(self, project: Path, url: str, clients: int = 3):
        split = load_split(project / paths.PREPARED_DIR, "test")
        self.x, self.y = np.asarray(split.x), np.asarray(split.y)
        self.url, self.statuses, self.versions = url, [], set()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._client, args=(i,)) for i in range(clients)]
        for t in self.threads:
            t.start()

    def _client(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        while not self.stop.is_set():
            i = int(rng.integers(len(self.x)))
            headers = {**JSON, "X-Tollgate-Route-Key": uuid.uuid4().hex}
            body = orjson.dumps({"inputs": self.x[i : i + 1].tolist()})
            status, out = http("POST", self.url + "/invocations", body, headers)
            self.statuses.append(status)
            if status == 200:
                self.versions.add(out["version"])
                label = {"request_id": out["request_id"], "label": str(self.y[i])}
                auth = {**JSON, "Authorization": f"Bearer {TOKENS['TOLLGATE_FEEDBACK_TOKEN']}"}
                http("POST", self.url + "/feedback", orjson.dumps(label), auth)

    def end(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()


@pytest.fixture
def served(project):
    champion_back(project)
    srv = Server(project, TOKENS)
    yield srv
    srv.stop()


def _canary_on_server(url) -> dict | None:
    return http("GET", f"{url}/v2/models/{NAME}")[1]["parameters"]["canary"]


def test_a_candidate_wrong_on_two_classes_is_rolled_back_by_the_label_test(project, served):
    version = _register(project, _swap_two_classes)
    traffic = Traffic(project, served.url)
    try:
        proc = run(["tollgate", "promote", "--version", version], cwd=project, check=False)
    finally:
        traffic.end()
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"canary v{version} rolled back at 50 %: " in proc.stderr
    assert "label accuracy: canary " in proc.stderr and "Fisher p=" in proc.stderr
    assert "@champion unchanged (v2)" in proc.stderr
    assert _alias(project, "champion") == "2" and _alias(project, "canary") is None
    assert _canary_on_server(served.url) is None
    assert set(traffic.statuses) == {200} and {version, "2"} <= traffic.versions
    tags = model_client(project).get_model_version(NAME, version).tags
    assert tags["tollgate.canary.result"].startswith("rolled back at 50 %: ")
    assert "label accuracy: canary " in tags["tollgate.canary.result"]
    metrics = http_text(served.url + "/metrics")
    assert f'tollgate_variant_requests_total{{outcome="ok",variant="canary",version="{version}"}}' in metrics


def test_a_candidate_failing_5_percent_of_requests_is_rolled_back_on_the_error_rate(project):
    champion_back(project)
    srv = Server(project, {**TOKENS, "TOLLGATE_FAILPOINT": "serve:canary:raise=0.05"})
    version = _register(project)
    traffic = Traffic(project, srv.url)
    try:
        proc = run(["tollgate", "promote", "--version", version], cwd=project, check=False)
    finally:
        traffic.end()
        srv.stop()
    assert proc.returncode == 1
    assert f"canary v{version} rolled back at 50 %: error rate: " in proc.stderr
    assert _alias(project, "champion") == "2" and _alias(project, "canary") is None
    assert set(traffic.statuses) == {200, 500}


def test_a_rollout_whose_driver_is_killed_is_resumed_to_the_end(project, served):
    version = _register(project)  # equal to the champion: it should pass every step
    traffic = Traffic(project, served.url)
    try:
        killed = subprocess.run(
            ["tollgate", "promote", "--version", version],
            cwd=project,
            capture_output=True,
            text=True,
            env={**tool_env(project), "TOLLGATE_FAILPOINT": "canary:waiting"},
        )
        assert killed.returncode == -signal.SIGKILL
        assert _alias(project, "canary") == version and _canary_on_server(served.url) is not None
        status = run(["tollgate", "canary", "status"], cwd=project).stdout
        assert f"canary v{version} (champion v2), step 1/2" in status and "dead: tollgate promote" in status
        out = run(["tollgate", "promote", "--resume"], cwd=project).stdout
    finally:
        traffic.end()
    assert f"@champion → {NAME} v{version} (was v2)" in out and "canary passed 50 %: passed" in out
    assert _alias(project, "champion") == version and _alias(project, "canary") is None
    assert http("GET", f"{served.url}/v2/models/{NAME}")[1]["versions"] == [version]
    assert _canary_on_server(served.url) is None and set(traffic.statuses) == {200}
    assert "no canary rollout in progress" in run(["tollgate", "canary", "status"], cwd=project).stdout
