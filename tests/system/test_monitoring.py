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
FEEDBACK_TOKEN = "labelling-token"  # a labeller's, not the admin's
TOKENS = {"TOLLGATE_ADMIN_TOKEN": TOKEN, "TOLLGATE_FEEDBACK_TOKEN": FEEDBACK_TOKEN}
AUTH = {"Authorization": f"Bearer {FEEDBACK_TOKEN}", "Content-Type": "application/json"}


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
    from pipeline.data import shards

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = shards.read_latest(shards.LocalFolder(project / "data" / "live"), shards.SAMPLES)
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
    server = Server(project, TOKENS)
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
    # the cost: clean windows keep their accuracy estimate and start no retraining; inverted digits do
    for result in (first_clean, second_clean):
        assert result["retrain"] is False and result["accuracy"]["estimate"] > 0.9, result["accuracy"]
    assert distorted["retrain"] is True and distorted["accuracy"]["estimate"] < 0.5, distorted["accuracy"]
    print("estimated accuracy: clean", first_clean["accuracy"]["estimate"], "inverted", distorted["accuracy"])
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
    before = sorted(feedback.rglob("*"))
    cases = [
        ({"request_id": "no-such-request", "label": "3"}, AUTH, 404),
        ({"request_id": rid, "label": "cat"}, AUTH, 422),
        ({"request_id": rid, "label": "3", "item": 5}, AUTH, 422),
        ({"request_id": rid, "label": "3", "pad": "x" * 20_000}, AUTH, 413),
        ({"request_id": rid, "label": "3"}, {"Content-Type": "application/json"}, 401),
        ({"request_id": rid, "label": "3"}, {**AUTH, "Authorization": "Bearer wrong"}, 401),
        ({"request_id": rid, "label": "3"}, {**AUTH, "Authorization": f"Bearer {TOKEN}"}, 401),  # the admin's
    ]
    for payload, headers, expected in cases:
        status, out = http("POST", url + "/feedback", json.dumps(payload).encode(), headers)
        assert status == expected, (payload.get("label"), status, out)
    assert sorted(feedback.rglob("*")) == before


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
    from pipeline.data import shards

    # a folder holding only the clean traffic, for the "no drift" run
    clean = {k: v[:2000] for k, v in traffic["rows"].items()}
    live_clean = shards.LocalFolder(project / "data" / "live-clean")
    shards.write_shard(live_clean, shards.shard_name(shards.SAMPLES, clean["time"][0], 1), clean)

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
        assert state.is_completed() and state.message.startswith("no drift: "), state.message
        assert retraining_runs() == 0
        state = drift_check(root=str(project), return_state=True)
        print(state.message)
        assert state.is_completed() and state.message.startswith("retrain (estimated accuracy dropped"), (
            state.message
        )
        assert retraining_runs() == 1


def test_feedback_becomes_a_new_data_version_and_a_better_model(project, traffic):
    url, ids, labels = traffic["server"].url, traffic["ids"], traffic["labels"]
    classes = json.loads((project / "data" / "prepared" / "manifest.json").read_text())["classes"]
    old_version = json.loads((project / "data" / "prepared" / "manifest.json").read_text())["data_version"]
    for i in range(traffic["n_unique"]):  # each distinct inverted digit once
        payload = {"request_id": ids[i], "label": classes[labels[i]]}
        status, out = http("POST", url + "/feedback", json.dumps(payload).encode(), AUTH)
        assert status == 201, out
    from pipeline.data import shards
    from pipeline.data.feedback import feedback_rows

    folder = shards.LocalFolder(project / "data" / "feedback")
    assert len(feedback_rows(folder)["label"]) == traffic["n_unique"]
    assert len(shards.shard_names(folder, shards.FEEDBACK)) < 100  # merged, not one small file per answer
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
        return Server(project, {**TOKENS, **(env or {})})
    finally:
        set_param(project, "serve.shadow", False)


def test_shadow_challenger_agreement_and_latency_are_reported(project, traffic):
    from pipeline.data import shards
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
    assert report == shadow_summary(
        shards.LocalFolder(project / "data" / "live"), shards.LocalFolder(project / "data" / "feedback")
    )

    set_param(project, "promote.shadow_min_requests", 100_000)
    try:
        proc = run(["tollgate", "promote"], cwd=project, check=False)
    finally:
        set_param(project, "promote.shadow_min_requests", 0)
    assert proc.returncode == 1 and "online gate" in proc.stderr


@pytest.mark.parametrize("failure", ["raise", "sleep=1"])
def test_a_failing_or_slow_challenger_changes_no_response(project, traffic, failure):
    clean_x, _ = _prepared(project, "test")
    plain = Server(project, TOKENS)
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


# --- defects found by probing a running server: each reproduced by a real action, on real files -----------


def test_a_stray_file_in_the_live_folder_never_switches_the_bounds_off(project):
    live = project / "data" / "live-stray"
    live.mkdir(parents=True, exist_ok=True)
    stray = live / "reference.npz"
    stray.write_bytes((project / "models" / "reference.npz").read_bytes())  # a copy someone left there
    set_param(project, "monitor.folder", "data/live-stray")
    set_param(project, "monitor.max_mb", 0.3)
    server = Server(project, TOKENS)
    try:
        clean_x, _ = _prepared(project, "test")
        for i in range(1500):
            assert _score(server.url, clean_x[i % len(clean_x)])[0] == 200
        time.sleep(1.0)  # the last flush
        shards_bytes = sum(p.stat().st_size for p in live.glob("samples-*.npz"))
        assert shards_bytes <= 0.3e6 + 200_000, shards_bytes  # one shard of slack
        assert stray.is_file()  # not a shard: neither counted nor deleted
    finally:
        server.stop()
        set_param(project, "monitor.max_mb", 1024.0)
        set_param(project, "monitor.folder", "data/live")


def test_a_reused_request_id_loses_no_sample_and_feedback_labels_its_newest(project):
    from pipeline.data import shards

    live = project / "data" / "live-reused"
    set_param(project, "monitor.folder", "data/live-reused")
    server = Server(project, TOKENS)
    try:
        clean_x, _ = _prepared(project, "test")
        for i in range(1100):
            assert _score(server.url, clean_x[i % len(clean_x)], {"X-Request-ID": "retried-id"})[0] == 200
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            rows = shards.read_latest(shards.LocalFolder(live), shards.SAMPLES)
            if (
                rows
                and len(rows["time"]) + _metric(server.url, "tollgate_live_samples_dropped_total") >= 1100
            ):
                break
            time.sleep(0.3)
        taken = _metric(server.url, "tollgate_live_samples_total")
        dropped = _metric(server.url, "tollgate_live_samples_dropped_total")
        assert taken == 1100 and len(rows["time"]) + dropped == 1100, (len(rows["time"]), dropped)
        assert len(list(live.glob("samples-*.npz"))) < 1100 / 5  # not a shard per request
        payload = {"request_id": "retried-id", "label": "3"}
        status, out = http("POST", server.url + "/feedback", json.dumps(payload).encode(), AUTH)
        assert status == 201, out
    finally:
        server.stop()
        set_param(project, "monitor.folder", "data/live")


def test_damaged_shards_are_skipped_and_named_by_every_reader(project, traffic):
    from pipeline.data import shards

    live = project / "data" / "live"
    name = shards.shard_names(shards.LocalFolder(live), shards.SAMPLES)[-1]
    truncated = live / name
    request = str(np.load(truncated)["request"][0])
    truncated.write_bytes(truncated.read_bytes()[:100])
    (live / "shadow-0000000000001-1-000001.npz").write_bytes(b"")
    out = run(["tollgate", "monitor"], cwd=project)
    assert "damaged shard" in out.stderr and name in out.stderr
    report = json.loads((project / "reports" / "monitor.json").read_text())
    assert any(name in d for d in report["damaged_shards"])
    shadow = json.loads(run(["tollgate", "shadow"], cwd=project).stdout)
    assert any("shadow-0000000000001-1-000001.npz" in d for d in shadow["damaged_shards"])
    payload = {"request_id": request, "label": "3"}
    status, out = http("POST", traffic["server"].url + "/feedback", json.dumps(payload).encode(), AUTH)
    assert status == 404, out  # its input is gone: not a 500


def test_a_challenger_that_fails_in_shadow_is_refused_by_the_online_gate(project):
    client = model_client(project)
    candidate = json.loads((project / "reports" / "registration.json").read_text())["version"]
    champion = str(client.get_model_version_by_alias(NAME, "champion").version)
    other = "1" if candidate != "1" else "2"
    # the registered candidate runs in shadow (and fails on every image) beside another champion
    client.set_registered_model_alias(NAME, "champion", other)
    client.set_registered_model_alias(NAME, "challenger", candidate)
    set_param(project, "monitor.folder", "data/live-failing")
    server = _shadow_server(project, {"TOLLGATE_FAILPOINT": "shadow:predict:raise"})
    try:
        clean_x, _ = _prepared(project, "test")
        for i in range(60):
            assert _score(server.url, clean_x[i])[0] == 200
        deadline = time.monotonic() + 30
        while _metric(server.url, 'tollgate_shadow_images_total{outcome="error"}') < 60:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    finally:
        server.stop()
    registration = json.loads((project / "reports" / "registration.json").read_text())
    set_param(project, "promote.shadow_min_requests", 50)
    set_param(project, "promote.shadow_max_disagreement", 0.2)
    try:
        proc = run(["tollgate", "promote"], cwd=project, check=False)
    finally:
        set_param(project, "promote.shadow_min_requests", 0)
        set_param(project, "promote.shadow_max_disagreement", 1.0)
        set_param(project, "monitor.folder", "data/live")
        client.set_registered_model_alias(NAME, "champion", champion)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "online gate" in proc.stderr and "60 of 60 failed" in proc.stderr, proc.stderr
    assert json.loads((project / "reports" / "registration.json").read_text()) == registration


def test_concurrent_relabels_through_the_server_leave_one_label_per_input(project, traffic):
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.data import shards
    from pipeline.data.feedback import feedback_labels

    url = traffic["server"].url
    clean_x, _ = _prepared(project, "test")
    ids = [_score(url, clean_x[i])[1]["request_id"] for i in range(20)]  # sampled just now
    jobs = [(rid, str(label)) for rid in ids for label in range(8)]

    def post(job):
        body = json.dumps({"request_id": job[0], "label": job[1]}).encode()
        return http("POST", url + "/feedback", body, AUTH)[0]

    with ThreadPoolExecutor(8) as pool:
        assert set(pool.map(post, jobs)) == {201}
    labels = feedback_labels(shards.LocalFolder(project / "data" / "feedback"))
    assert {rid for rid, _ in labels if rid in ids} == set(ids)  # one label for each input, no second


def test_a_corrupted_reference_names_the_version_and_file(project, traffic):
    store_root = project / "mlartifacts"
    references = sorted(store_root.rglob("reference.npz"))
    assert references
    saved = {p: p.read_bytes() for p in references}
    try:
        for p in references:
            p.write_bytes(b"not a zip")
        proc = run(["tollgate", "monitor"], cwd=project, check=False)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert "reference.npz cannot be read" in proc.stderr and " v" in proc.stderr
    finally:
        for p, data in saved.items():
            p.write_bytes(data)


def test_a_locked_tracking_store_is_named_with_what_to_do(project):
    import sqlite3

    db = sqlite3.connect(project / "mlflow.db", timeout=1)
    db.execute("BEGIN EXCLUSIVE")
    try:
        proc = run(["tollgate", "monitor"], cwd=project, check=False)
    finally:
        db.rollback()
        db.close()
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "mlflow.db" in proc.stderr and "locked" in proc.stderr
