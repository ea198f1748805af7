"""Closing the loop on a real server: live sampling, drift against the training reference, feedback that
becomes data and a better model, the drift-check flow on a real Prefect server, and the shadow challenger."""

import json
import time

import numpy as np
import pytest

from tests.support import Server, http, make_project, model_client, run, set_param

pytestmark = pytest.mark.slow
NAME = "tollgate-classifier"
TOKEN = "monitoring-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}


def _score(url: str, image: np.ndarray, headers: dict | None = None) -> tuple[int, dict, float]:
    body = json.dumps({"inputs": image[None].tolist()}).encode()
    start = time.perf_counter()
    status, out = http(
        "POST", url + "/invocations", body, {"Content-Type": "application/json", **(headers or {})}
    )
    return status, out, time.perf_counter() - start


def _metric(url: str, name: str) -> float:
    import urllib.request

    with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def _prepared(project, split: str) -> tuple[np.ndarray, np.ndarray]:
    d = project / "data" / "prepared"
    return np.load(d / f"{split}_x.npy"), np.load(d / f"{split}_y.npy")


def _samples_written(project, n: int, timeout: float = 30) -> dict:
    from pipeline.monitoring import shards

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = shards.read_latest(project / "data" / "live", shards.SAMPLES)
        if rows and len(rows["time"]) >= n:
            return rows
        time.sleep(0.2)
    raise AssertionError(f"fewer than {n} samples written within {timeout} s")


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    project = make_project(tmp_path_factory.mktemp("monitoring") / "project")
    set_param(project, "monitor.sample_fraction", 1.0)
    set_param(project, "monitor.flush_s", 0.3)
    set_param(project, "serve.follow_interval_s", 1.0)
    run(["dvc", "repro"], cwd=project)
    return project


@pytest.fixture(scope="module")
def traffic(project):
    """2,000 clean test images, then 2,000 inverted digits (all 1,797 once, then the first 203 again),
    through a sampling server; the request ids and true labels of the inverted ones."""
    clean_x, _ = _prepared(project, "test")
    xs, ys = zip(*(_prepared(project, s) for s in ("train", "val", "test")), strict=True)
    inverted, labels = 255 - np.concatenate(xs), np.concatenate(ys)
    server = Server(project, {"TOLLGATE_ADMIN_TOKEN": TOKEN})
    try:
        for i in range(2000):
            assert _score(server.url, clean_x[i % len(clean_x)])[0] == 200
        ids = []
        for i in range(2000):
            status, out, _ = _score(server.url, inverted[i % len(inverted)])
            assert status == 200
            ids.append(out["request_id"])
        rows = _samples_written(project, 4000)
        yield {"server": server, "ids": ids, "labels": labels, "rows": rows, "n_unique": len(inverted)}
    finally:
        server.stop()


def test_the_monitor_flags_distorted_traffic_and_not_clean_traffic(project, traffic):
    from pipeline.core.config import load_params
    from pipeline.monitoring import drift
    from pipeline.monitoring import report as monitor
    from pipeline.registry import store as tracking

    params = load_params(project / "params.yaml")
    rows = traffic["rows"]
    assert set(rows["version"].tolist()) == {"1"} and len(rows["time"]) == 4000
    assert rows["x"].dtype == np.uint8 and rows["x"].shape[1:] == (8, 8, 1)  # the input as the model saw it
    store = tracking.connect(params, project)
    reference = monitor.reference_of(store, NAME, "1")
    window = monitor.window_of(rows)
    cfg = params.monitor
    first_clean = drift.compare(reference, window.part(0, 500), cfg)
    second_clean = drift.compare(reference, window.part(1500, 2000), cfg)
    distorted = drift.compare(reference, window.part(3500, 4000), cfg)
    for name, result in (
        ("clean 0-500", first_clean),
        ("clean 1500-2000", second_clean),
        ("inverted", distorted),
    ):
        print(
            name, {k: (c["effect"], f"{c['p_value']:.1e}", c["drift"]) for k, c in result["checks"].items()}
        )
    assert first_clean["drift"] is False and second_clean["drift"] is False
    assert distorted["drift"] is True
    delay = drift.first_alarm(reference, window, cfg, start=2000, step=25)
    print(f"drift detected {delay} requests after the distortion began")
    assert delay is not None and delay <= cfg.window

    proc = run(["tollgate", "monitor"], cwd=project)
    assert "DRIFT" in proc.stdout
    report = json.loads((project / "reports" / "monitor.json").read_text())
    assert report["drift"] is True and report["version"] == "1" and report["samples"] == cfg.window
    assert "data:image/png;base64," in (project / "reports" / "monitor.html").read_text()
    client = model_client(project)
    logged = client.get_run(report["mlflow_run_id"])
    assert logged.data.tags["tollgate.model_version"] == "1" and logged.data.tags["tollgate.drift"] == "drift"
    assert client.get_model_version(NAME, "1").tags["monitor.drift"] == "drift"

    # the server's own rolling figures saw it too
    url = traffic["server"].url
    assert _metric(url, "tollgate_live_samples_total") == 4000
    assert _metric(url, "tollgate_drift_detected") >= 1


def test_bad_feedback_is_refused_and_writes_nothing(project, traffic):
    url, rid = traffic["server"].url, traffic["ids"][0]
    feedback = project / "data" / "feedback"
    before = sorted(feedback.rglob("*.png"))
    cases = [
        ({"request_id": "no-such-request", "label": "3"}, AUTH, 404),
        ({"request_id": rid, "label": "cat"}, AUTH, 422),
        ({"request_id": rid, "label": "3", "item": 5}, AUTH, 422),
        ({"request_id": rid, "label": "3", "pad": "x" * 20_000}, AUTH, 413),
        ({"request_id": rid, "label": "3"}, {"Content-Type": "application/json"}, 401),
        ({"request_id": rid, "label": "3"}, {**AUTH, "Authorization": "Bearer wrong"}, 401),
    ]
    for payload, headers, expected in cases:
        status, out = http("POST", url + "/feedback", json.dumps(payload).encode(), headers)
        assert status == expected, (payload.get("label"), status, out)
    assert sorted(feedback.rglob("*.png")) == before


def test_a_full_sampling_queue_drops_samples_and_never_fails_a_request(project):
    set_param(project, "monitor.queue_size", 2)
    # the writer stalls on every request it takes: the queue fills at once
    server = Server(project, {"TOLLGATE_FAILPOINT": "sampler:take:sleep=2"})
    try:
        clean_x, _ = _prepared(project, "test")
        results = [_score(server.url, clean_x[i]) for i in range(50)]
        assert all(status == 200 for status, _, _ in results)
        assert max(seconds for _, _, seconds in results) < 1.0
        assert _metric(server.url, "tollgate_live_samples_dropped_total") >= 40
    finally:
        server.stop()
        set_param(project, "monitor.queue_size", 4096)


def test_the_drift_check_deployment_starts_a_retraining_run_only_on_drift(project, traffic):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
    from prefect.testing.utilities import prefect_test_harness

    from flows.deployments import deployments
    from flows.monitor import drift_check
    from pipeline.monitoring import shards

    # a folder holding only the clean traffic, for the "no drift" run
    clean = {k: v[:2000] for k, v in traffic["rows"].items()}
    shards.write_shard(
        shards.shard_path(project / "data" / "live-clean", shards.SAMPLES, clean["time"][0], 1), clean
    )

    def retraining_runs() -> int:
        with get_client(sync_client=True) as client:
            return len(
                client.read_flow_runs(
                    deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["retrain-on-drift"]))
                )
            )

    with prefect_test_harness(server_startup_timeout=120):
        (retrain,) = [d for d in deployments(project) if d.name == "retrain-on-drift"]
        assert retrain.parameters == {"force": False, "params": {"data.use_feedback": True}}
        retrain.apply()
        set_param(project, "monitor.folder", "data/live-clean")
        try:
            state = drift_check(root=str(project), return_state=True)
        finally:
            set_param(project, "monitor.folder", "data/live")
        assert state.is_completed() and state.message == "no drift", state.message
        assert retraining_runs() == 0
        state = drift_check(root=str(project), return_state=True)
        print(state.message)
        assert state.is_completed() and state.message.startswith("drift ("), state.message
        assert retraining_runs() == 1


def test_feedback_becomes_a_new_data_version_and_a_better_model(project, traffic):
    url, ids, labels = traffic["server"].url, traffic["ids"], traffic["labels"]
    classes = json.loads((project / "data" / "prepared" / "manifest.json").read_text())["classes"]
    old_version = json.loads((project / "data" / "prepared" / "manifest.json").read_text())["data_version"]
    for i in range(traffic["n_unique"]):  # each distinct inverted digit once
        payload = {"request_id": ids[i], "label": classes[labels[i]]}
        status, out = http("POST", url + "/feedback", json.dumps(payload).encode(), AUTH)
        assert status == 201, out
    stored = sorted((project / "data" / "feedback").rglob("*.png"))
    assert len(stored) == traffic["n_unique"]
    assert _metric(url, 'tollgate_feedback_total{code="201"}') == traffic["n_unique"]

    status = run(["dvc", "status", "prepare"], cwd=project).stdout
    assert "data/feedback" in status and "modified" in status

    set_param(project, "data.use_feedback", True)
    run(["dvc", "repro"], cwd=project)
    manifest = json.loads((project / "data" / "prepared" / "manifest.json").read_text())
    assert manifest["data_version"] != old_version
    assert sum(manifest["counts"]["feedback"].values()) == pytest.approx(0.3 * traffic["n_unique"], abs=10)
    assert json.loads((project / "reports" / "validation.json").read_text())["passed"]
    gate = json.loads((project / "reports" / "gate.json").read_text())
    (check,) = [c for c in gate["checks"] if c["key"] == "max_feedback_drop"]
    before, after = check["threshold"], check["value"]  # the champion (v1) and the candidate on the slice
    print(f"accuracy on the inverted feedback slice: v1 {before:.4f} -> candidate {after:.4f}")
    assert after > before + 0.3
    assert "feedback slice accuracy vs champion v1" in (project / "reports" / "gate.md").read_text()
    assert gate["passed"], gate["reasons"]
    assert str(model_client(project).get_model_version_by_alias(NAME, "champion").version) == "2"


def _shadow_server(project, env: dict | None = None) -> Server:
    set_param(project, "serve.shadow", True)
    try:
        return Server(project, {"TOLLGATE_ADMIN_TOKEN": TOKEN, **(env or {})})
    finally:
        set_param(project, "serve.shadow", False)


def test_shadow_challenger_agreement_and_latency_are_reported(project, traffic):
    from pipeline.monitoring.shadow_report import shadow_summary

    client = model_client(project)
    champion = str(client.get_model_version_by_alias(NAME, "champion").version)
    client.set_registered_model_alias(NAME, "challenger", "1")  # the older model, in shadow
    clean_x, _ = _prepared(project, "test")
    server = _shadow_server(project)
    try:
        assert champion == "2"
        for i in range(300):
            assert _score(server.url, clean_x[i])[0] == 200
        deadline = time.monotonic() + 30
        while _metric(server.url, "tollgate_shadow_images_total") < 300 and time.monotonic() < deadline:
            time.sleep(0.2)
        agree = _metric(server.url, 'tollgate_shadow_images_total{outcome="agree"}')
        assert agree >= 250  # two good models agree on most clean digits
        assert _metric(server.url, "tollgate_shadow_latency_seconds_count") >= 300
    finally:
        server.stop()
    report = json.loads(run(["tollgate", "shadow"], cwd=project).stdout)
    print("shadow report:", report)
    assert report["challenger"] == "1" and report["images"] >= 300 and report["errors"] == 0
    assert report["agreement"] > 0.8 and report["latency_ms"]["p99"] > 0
    assert report == shadow_summary(project / "data" / "live", project / "data" / "feedback")

    set_param(project, "promote.shadow_min_requests", 100_000)
    try:
        proc = run(["tollgate", "promote"], cwd=project, check=False)
    finally:
        set_param(project, "promote.shadow_min_requests", 0)
    assert proc.returncode == 1 and "online gate" in proc.stderr


@pytest.mark.parametrize("failure", ["raise", "sleep=1"])
def test_a_failing_or_slow_challenger_changes_no_response(project, traffic, failure):
    clean_x, _ = _prepared(project, "test")
    plain = Server(project, {"TOLLGATE_ADMIN_TOKEN": TOKEN})
    try:
        expected = [_score(plain.url, clean_x[i])[1]["predictions"] for i in range(40)]
    finally:
        plain.stop()
    set_param(project, "serve.shadow_queue", 4)  # a sleeping challenger falls behind at once
    try:
        server = _shadow_server(project, {"TOLLGATE_FAILPOINT": f"shadow:predict:{failure}"})
    finally:
        set_param(project, "serve.shadow_queue", 256)
    try:
        got = [_score(server.url, clean_x[i]) for i in range(40)]
        assert [out["predictions"] for _, out, _ in got] == expected
        assert max(seconds for _, _, seconds in got) < 0.5
        time.sleep(1.5)
        counted = _metric(server.url, 'tollgate_shadow_images_total{outcome="error"}') + _metric(
            server.url, 'tollgate_shadow_images_total{outcome="dropped"}'
        )
        assert counted >= (40 if failure == "raise" else 20)
    finally:
        server.stop()
