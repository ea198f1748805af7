"""The whole chain as a user drives it: `dvc repro` in a fresh copy of the repo, the MLflow registry it
fills, and `tollgate serve` answering on 127.0.0.1. Tests run in order on one project."""

import json
import math

import numpy as np
import pytest

from pipeline import paths
from tests.support import Server, http, model_client, run, set_param

pytestmark = pytest.mark.slow
NAME = "tollgate-classifier"


@pytest.fixture(scope="module")
def project(cold_project):
    return cold_project["path"]


@pytest.fixture(scope="module")
def server(project):
    srv = Server(project)
    yield srv
    srv.stop()


def _report(project, rel):
    return json.loads((project / rel).read_text())


def _versions(project):
    return sorted(int(mv.version) for mv in model_client(project).search_model_versions(f"name='{NAME}'"))


def _alias(project, alias):
    return str(model_client(project).get_model_version_by_alias(NAME, alias).version)


def test_cold_run_registers_and_promotes_version_1_with_lineage(cold_project, project):
    for stage in ("prepare", "train", "evaluate", "register", "promote"):
        assert f"Running stage '{stage}'" in cold_project["output"]
    assert _versions(project) == [1]
    assert _alias(project, "champion") == "1" and _alias(project, "challenger") == "1"

    client = model_client(project)
    mv = client.get_model_version(NAME, "1")
    manifest = _report(project, f"{paths.PREPARED_DIR}/manifest.json")
    commit = run(["git", "rev-parse", "HEAD"], cwd=project).stdout.strip()
    assert mv.tags["data_version"] == manifest["data_version"]
    assert mv.tags["git_commit"] == commit
    assert mv.tags["device"] == "cpu"
    assert [c["check"] for c in json.loads(mv.tags["gate"])] == ["accuracy", "macro_f1", "vs champion"]

    mlflow_run = client.get_run(mv.run_id)
    epochs = int(mlflow_run.data.params["train.epochs"])
    assert mlflow_run.data.metrics["test_accuracy"] == pytest.approx(
        _report(project, paths.EVAL_METRICS)["accuracy"]
    )
    assert len(client.get_metric_history(mv.run_id, "val_accuracy")) == epochs
    assert mlflow_run.data.tags["tollgate.data_version"] == manifest["data_version"]

    summary = run(["tollgate", "summary"], cwd=project).stdout
    assert f"{NAME} v1 @challenger" in summary and "promoted tollgate-classifier v1 to @champion" in summary
    assert manifest["data_version"][:12] in summary and "mlflow ui" in summary


def test_second_run_without_changes_is_a_no_op(project):
    before = (project / "dvc.lock").read_text()
    out = run(["dvc", "repro"], cwd=project).stdout
    assert "Running stage" not in out
    assert "Data and pipelines are up to date" in out
    assert (project / "dvc.lock").read_text() == before
    assert _versions(project) == [1]


def test_server_predicts_real_test_images_correctly(project, server):
    from PIL import Image

    from pipeline.data import load_split
    from pipeline.model import load, predict_proba

    files = run(["tollgate", "samples", "--out", "samples", "-n", "40"], cwd=project).stdout.split()
    labels = json.loads((project / "samples" / "labels.json").read_text())
    model, _ = load(project / paths.MODEL_DIR)
    correct = 0
    for rel in files:
        path = project / rel
        status, body = http("POST", server.url + "/predict", path.read_bytes(), {"Content-Type": "image/png"})
        assert status == 200 and body["version"] == "1"
        local = predict_proba(model, np.asarray(Image.open(path))[None, ..., None]).argmax(1).item()
        assert body["predictions"][0]["class"] == str(local)  # served exactly as evaluated
        correct += body["predictions"][0]["class"] == labels[path.name]
    assert correct >= 0.95 * len(files)

    test = load_split(project / paths.PREPARED_DIR, "test")
    status, body = http(
        "POST", server.url + "/invocations", json.dumps({"inputs": test.x[:8].tolist()}).encode()
    )
    assert status == 200
    assert (
        np.asarray(body["predictions"]).argmax(1).tolist()
        == predict_proba(model, test.x[:8]).argmax(1).tolist()
    )


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "says"),
    [
        ("POST", "/invocations", b"{not json", 400, "JSON"),
        ("POST", "/invocations", b'{"inputs": [[1, 2, 3]]}', 400, "shape"),
        ("POST", "/invocations", b'{"rows": []}', 400, "inputs"),
        ("POST", "/invocations", json.dumps({"inputs": [[[[math.nan]] * 8] * 8]}).encode(), 400, "finite"),
        ("POST", "/predict", b"", 400, "empty"),
        ("POST", "/predict", b"GIF89a not really", 400, "PNG or JPEG"),
        ("GET", "/v2/models/someone-else", None, 404, "unknown model"),
        ("POST", "/admin/reload", b"", 401, "token"),
    ],
)
def test_bad_requests_get_a_4xx_that_says_what_was_expected(server, method, path, body, status, says):
    got, payload = http(method, server.url + path, body)
    assert got == status
    assert says in payload["detail"]
    assert http("GET", server.url + "/v2/health/ready")[0] == 200


def test_changing_a_training_param_retrains_and_the_running_server_follows(project, server):
    set_param(project, "train.epochs", 14)
    out = run(["dvc", "repro"], cwd=project).stdout
    assert "Running stage 'prepare'" not in out and "Running stage 'train'" in out
    assert _versions(project) == [1, 2]
    assert _alias(project, "champion") == "2" and _alias(project, "previous") == "1"
    promotion = _report(project, paths.PROMOTION)
    assert promotion["promoted"] and promotion["served_by"] == server.url
    status, meta = http("GET", f"{server.url}/v2/models/{NAME}")
    assert status == 200 and meta["versions"] == ["2"]
    gate = _report(project, paths.GATE_REPORT)
    assert [c["check"] for c in gate["checks"]][2:] == ["accuracy vs champion v1", "macro_f1 vs champion v1"]


def test_a_worse_candidate_is_rejected_and_nothing_moves(project, server):
    set_param(project, "train.epochs", 0)
    run(["dvc", "repro"], cwd=project)
    gate = _report(project, paths.GATE_REPORT)
    assert not gate["passed"]
    assert gate["reasons"][0].startswith("accuracy 0.")
    assert _versions(project) == [1, 2]
    assert _alias(project, "champion") == "2"
    assert http("GET", f"{server.url}/v2/models/{NAME}")[1]["versions"] == ["2"]
    assert "rejected" in _report(project, paths.PROMOTION)["reason"]
    rejected_run = model_client(project).get_run(gate["run_id"])
    assert "accuracy" in rejected_run.data.tags["tollgate.rejected"]
    assert "gate        FAILED: accuracy" in run(["tollgate", "summary"], cwd=project).stdout


def test_rerunning_register_does_not_duplicate_a_version(project):
    set_param(project, "train.epochs", 14)
    run(["dvc", "repro"], cwd=project)
    versions = _versions(project)
    run(["dvc", "repro", "--force", "--single-item", "register"], cwd=project)
    assert _versions(project) == versions
    assert _report(project, paths.REGISTRATION)["existing"] is True


def test_a_validation_failure_stops_the_chain_and_registers_nothing(project):
    versions = _versions(project)
    champion = _alias(project, "champion")
    set_param(project, "data.test_fraction", 0.001)  # rounds every class's test share down to zero images
    proc = run(["dvc", "repro"], cwd=project, check=False)
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert "data validation failed" in output and "class 0 has 0 in test" in output
    assert "Running stage 'train'" not in output
    assert _versions(project) == versions and _alias(project, "champion") == champion
    summary = run(["tollgate", "summary"], cwd=project).stdout
    assert "validation  FAILED" in summary
