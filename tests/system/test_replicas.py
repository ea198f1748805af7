"""Serving replicas that follow @champion by themselves (`serve.follow_interval_s`), as on other machines:
three `tollgate serve` processes in folders of their own sharing one registry, clients hammering all three
while a promotion moves the alias, and a replica that cannot load the new version making the promotion
roll back everywhere."""

from __future__ import annotations

import shutil
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import orjson
import pytest

from pipeline.core import paths
from pipeline.data.prepared import load_split
from tests.support import Server, http, http_text, model_client, run, set_param

pytestmark = pytest.mark.slow
NAME = "tollgate-classifier"
JSON = {"Content-Type": "application/json"}


def _alias(project, alias) -> str:
    return str(model_client(project).get_model_version_by_alias(NAME, alias).version)


def _served(url) -> str:
    return http("GET", f"{url}/v2/models/{NAME}")[1]["versions"][0]


def _machine(project, name: str):
    """A folder with the project's params alone, as a replica on another machine has."""
    folder = project.parent / name
    folder.mkdir(exist_ok=True)
    shutil.copy(project / paths.PARAMS, folder / paths.PARAMS)
    return folder


@pytest.fixture
def project(two_versions):
    """v2 is champion, v1 previous; promotion waits one follow interval (1 s) plus 5 s for replicas."""
    if _alias(two_versions, "champion") != "2":
        run(["tollgate", "rollback", "--to", "2"], cwd=two_versions)
    model_client(two_versions).set_registered_model_alias(NAME, "previous", "1")
    set_param(two_versions, "serve.follow_interval_s", 1.0)
    set_param(two_versions, "promote.timeout_s", 5.0)
    yield two_versions
    set_param(two_versions, "serve.follow_interval_s", 30.0)
    set_param(two_versions, "promote.timeout_s", 30.0)
    set_param(two_versions, "promote.replicas", [])


def _start(project, names: list[str], env: dict | None = None) -> list[Server]:
    registry = {"MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}", **(env or {})}
    with ThreadPoolExecutor(len(names)) as pool:
        return list(pool.map(lambda n: Server(_machine(project, n), registry), names))


def test_replicas_follow_a_promotion_without_a_failed_request_and_roll_back_together(project):
    body = orjson.dumps(
        {"inputs": np.asarray(load_split(project / paths.PREPARED_DIR, "test").x[:2]).tolist()}
    )
    replicas = _start(project, ["r1", "r2", "r3"])
    stop = threading.Event()
    results: dict[str, list[tuple[int, str | None]]] = {r.url: [] for r in replicas}

    def client(url: str) -> None:
        while not stop.is_set():
            status, out = http("POST", url + "/invocations", body, JSON)
            results[url].append((status, out.get("version") if isinstance(out, dict) else None))

    threads = [threading.Thread(target=client, args=(r.url,)) for r in replicas for _ in range(2)]
    for t in threads:
        t.start()
    try:
        urls = ",".join(r.url for r in replicas)
        out = run(["tollgate", "rollback", "--to", "1"], cwd=project, TOLLGATE_REPLICAS=urls).stdout
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert "3 replica(s) follow it, verified" in out
    assert _alias(project, "champion") == "1" and [_served(r.url) for r in replicas] == ["1"] * 3
    for url, seen in results.items():  # every replica swapped under load without failing a request
        assert all(status == 200 for status, _ in seen), (url, {s for s, _ in seen})
        assert {"1", "2"} <= {v for _, v in seen}, url
    meta = http("GET", f"{replicas[0].url}/v2/models/{NAME}")[1]["parameters"]["follows"]
    assert meta["alias"] == "@champion" and meta["interval_s"] == 1.0 and meta["error"] is None
    metrics = http_text(replicas[0].url + "/metrics")
    assert 'tollgate_model_version{model="tollgate-classifier",version="1"} 1.0' in metrics
    assert "tollgate_alias_checked_timestamp_seconds" in metrics

    # A replica that cannot load the next version: the promotion rolls back, every replica ends on v1.
    replicas[2].stop()
    replicas[2:] = _start(project, ["r3"], {"TOLLGATE_FAILPOINT": "serve:swap:raise"})
    set_param(project, "promote.replicas", [r.url for r in replicas])
    try:
        proc = run(["tollgate", "rollback", "--to", "2"], cwd=project, check=False)
        assert proc.returncode == 1
        assert f"replicas did not follow to v2 in time: {replicas[2].url} still serves v1" in proc.stderr
        assert "@champion restored to v1" in proc.stderr and "replicas not back" not in proc.stderr
        assert _alias(project, "champion") == "1" and _alias(project, "previous") == "2"
        assert [_served(r.url) for r in replicas] == ["1"] * 3
        errors = [
            float(line.split()[1])
            for line in http_text(replicas[2].url + "/metrics").splitlines()
            if line.startswith("tollgate_follow_errors_total ")
        ]
        assert errors and errors[0] >= 1  # counted; the replica kept serving v1 throughout
    finally:
        for r in replicas:
            r.stop()
