"""The whole chain as a user drives it: `dvc repro` in a fresh copy of the repo, the MLflow registry it
fills, and `tollgate serve` answering on 127.0.0.1. The tests share one project (one cold run), and each
brings it to the state it needs first, so any of them runs alone (`pytest path::test_name`) too."""

import json
import re
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest

from pipeline.core import paths
from pipeline.evaluation.verdict import Verdict
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


def _two_versions(project):
    """At least two registered versions, so there is something to roll back to."""
    if len(_versions(project)) < 2:
        set_param(project, "train.epochs", 14)
        run(["dvc", "repro"], cwd=project)
    assert len(_versions(project)) >= 2


def test_cold_run_registers_and_promotes_version_1_with_lineage(cold_project, project):
    for stage in ("prepare", "train", "evaluate", "register", "promote"):
        assert f"Running stage '{stage}'" in cold_project["output"]
    assert "[tollgate] torch threads " in cold_project["output"]  # train chose its OpenMP wait policy
    assert _versions(project) == [1]
    assert _alias(project, "champion") == "1" and _alias(project, "challenger") == "1"

    client = model_client(project)
    mv = client.get_model_version(NAME, "1")
    manifest = _report(project, f"{paths.PREPARED_DIR}/manifest.json")
    commit = run(["git", "rev-parse", "HEAD"], cwd=project).stdout.strip()
    assert mv.tags["data_version"] == manifest["data_version"]
    assert mv.tags["git_commit"] == commit
    assert mv.tags["device"] == "cpu"
    # a short tag; the table is in the description. The latency check only warns, and may on a busy machine
    verdict = Verdict.load(project / paths.GATE_REPORT)
    assert verdict.passed and mv.tags["gate"] == verdict.summary()
    assert all("latency" in warning for warning in verdict.warnings)  # machine-dependent, and only that
    for check in (
        "accuracy",
        "macro_f1",
        "min class recall",
        "ece",
        "p99 latency ms",
        "model size MB",
        "shift stability",
        "vs champion",
    ):
        assert f"| {check} |" in mv.description
    assert mv.tags["infra_validation"] == "passed" and mv.tags["git_dirty"] == "false"
    assert {"data_version", "params_hash", "accuracy", "macro_f1"} <= set(mv.tags)
    # the description is the model card (evaluate's figures), with registration's own finding added
    assert mv.description.startswith("# Model card: small_cnn on `digits`")
    assert "Gate: **PASSED**, infra validation passed." in mv.description
    assert "| class | precision | recall |" in mv.description and "**Most confused pairs**" in mv.description
    about = client.get_registered_model(NAME).description
    assert "Image classifier over 10 classes (0, 1, 2" in about and "(N, 8, 8, 1)" in about
    assert "@champion" in about and "infra validation" in about

    mlflow_run = client.get_run(mv.run_id)
    epochs = int(mlflow_run.data.params["train.epochs"])
    assert mlflow_run.data.metrics["test_accuracy"] == pytest.approx(
        _report(project, paths.EVAL_METRICS)["accuracy"]
    )
    assert len(client.get_metric_history(mv.run_id, "val_accuracy")) == epochs
    assert mlflow_run.data.tags["tollgate.data_version"] == manifest["data_version"]
    assert mlflow_run.data.tags["tollgate.gate"] == verdict.summary()  # "passed", or warned on latency
    logged = {a.path for a in client.list_artifacts(mv.run_id, "evaluation")}
    assert {"evaluation/gate.md", "evaluation/confusion_matrix.png"} <= logged
    # the registered files are readable by an MLflow or KServe server running as another user
    stored = Path(urlparse(client.get_model_version_download_uri(NAME, "1")).path)
    for name in ("model.json", "model.pt", "MLmodel"):
        assert next(stored.rglob(name)).stat().st_mode & 0o044 == 0o044, name

    summary = run(["tollgate", "summary"], cwd=project).stdout
    assert f"{NAME} v1 @challenger" in summary and "@champion → tollgate-classifier v1;" in summary
    assert manifest["data_version"][:12] in summary and "mlflow ui" in summary


def test_second_run_without_changes_is_a_no_op(project):
    run(["dvc", "repro"], cwd=project)  # whatever state an earlier test left
    before = (project / "dvc.lock").read_text()
    out = run(["dvc", "repro"], cwd=project).stdout
    assert "Running stage" not in out
    assert "Data and pipelines are up to date" in out
    assert (project / "dvc.lock").read_text() == before
    assert (project / "dvc.lock").read_text() == before


def test_a_code_change_reruns_exactly_the_stages_that_run_that_code(project):
    """Every stage lists the modules it runs: editing one that only evaluate runs makes evaluate stale and
    nothing before it. DVC lists a later stage once its own inputs change: evaluate's new gate report
    (its timings differ) re-runs register, whose registration of the same version is byte-identical, so
    promote has nothing to redo."""
    run(["dvc", "repro"], cwd=project)
    module = project / "pipeline" / "stages" / "evaluate.py"
    original = module.read_text()
    try:
        module.write_text(original + "# a comment changes the code's hash\n")
        status = run(["dvc", "status"], cwd=project).stdout
        stale = {line.rstrip(":") for line in status.splitlines() if line and not line[0].isspace()}
        assert stale == {"evaluate"}, status
        assert "modified:           pipeline/stages/evaluate.py" in status
        out = run(["dvc", "repro"], cwd=project).stdout
        ran = re.findall(r"Running stage '(\w+)'", out)
        assert ran[0] == "evaluate" and not {"prepare", "validate", "train"} & set(ran), out
        assert "promote" not in ran  # the same version registered again: nothing to promote
    finally:
        module.write_text(original)
        run(["dvc", "repro"], cwd=project)


def test_server_predicts_real_test_images_correctly(project, server):
    from PIL import Image

    from pipeline.data.prepared import load_split
    from pipeline.training.model import load, predict_proba

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
        "POST",
        server.url + "/invocations",
        json.dumps({"inputs": test.x[:8].tolist()}).encode(),
        {"Content-Type": "application/json"},
    )
    assert status == 200
    assert (
        np.asarray(body["predictions"]).argmax(1).tolist()
        == predict_proba(model, test.x[:8]).argmax(1).tolist()
    )


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
    compared = [c["check"] for c in gate["checks"] if c["key"] in ("max_drop", "significance")]
    assert compared == ["accuracy vs champion v1", "macro_f1 vs champion v1", "paired vs champion v1"]


def test_a_worse_candidate_is_rejected_and_nothing_moves(project, server):
    run(["dvc", "repro"], cwd=project)
    versions, champion = _versions(project), _alias(project, "champion")
    set_param(project, "train.epochs", 0)
    run(["dvc", "repro"], cwd=project)
    gate = _report(project, paths.GATE_REPORT)
    assert not gate["passed"]
    assert gate["reasons"][0].startswith("accuracy 0.")
    assert _versions(project) == versions
    assert _alias(project, "champion") == champion
    assert http("GET", f"{server.url}/v2/models/{NAME}")[1]["versions"] == [champion]
    assert "rejected" in _report(project, paths.PROMOTION)["reason"]
    rejected_run = model_client(project).get_run(gate["run_id"])
    assert "accuracy" in rejected_run.data.tags["tollgate.rejected"]
    assert "gate        FAILED: accuracy" in run(["tollgate", "summary"], cwd=project).stdout


def test_rerunning_register_does_not_duplicate_a_version(project):
    set_param(project, "train.epochs", 14)
    run(["dvc", "repro"], cwd=project)
    versions, registration = _versions(project), _report(project, paths.REGISTRATION)
    out = run(["dvc", "repro", "--force", "--single-item", "register"], cwd=project).stdout
    assert _versions(project) == versions
    assert "(already registered for this run)" in out
    assert _report(project, paths.REGISTRATION) == registration  # unchanged: promote has nothing to redo


def test_rollback_restores_the_previous_version_and_the_server_serves_it(project, server):
    _two_versions(project)
    champion, previous = _alias(project, "champion"), _alias(project, "previous")
    assert champion != previous
    out = run(["tollgate", "rollback"], cwd=project).stdout
    assert f"v{previous} (was v{champion}); {server.url} serves it, verified" in out
    assert _alias(project, "champion") == previous and _alias(project, "previous") == champion
    assert http("GET", f"{server.url}/v2/models/{NAME}")[1]["versions"] == [previous]
    run(["tollgate", "rollback", "--to", champion], cwd=project)
    assert http("GET", f"{server.url}/v2/models/{NAME}")[1]["versions"] == [champion]


def test_rollback_to_a_missing_version_fails_and_changes_nothing(project, server):
    champion = _alias(project, "champion")
    proc = run(["tollgate", "rollback", "--to", "99"], cwd=project, check=False)
    assert proc.returncode != 0
    assert _alias(project, "champion") == champion
    assert http("GET", f"{server.url}/v2/models/{NAME}")[1]["versions"] == [champion]


def test_concurrent_promotions_leave_alias_and_server_in_agreement(project, server):
    import subprocess

    from tests.support import tool_env

    _two_versions(project)
    versions = [str(v) for v in _versions(project)][-2:]
    procs = [
        subprocess.Popen(
            ["tollgate", "rollback", "--to", v],
            cwd=project,
            env=tool_env(project),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for v in versions * 2
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    served = http("GET", f"{server.url}/v2/models/{NAME}")[1]["versions"]
    assert served == [_alias(project, "champion")]


def test_mlflow_models_serve_answers_for_the_registered_model(project):
    """The registry stays usable with the ecosystem's own tools: MLflow's scoring server on @champion."""
    from pipeline.core.config import load_params
    from pipeline.data.prepared import load_split
    from pipeline.registry.store import connect, model_uri
    from pipeline.training.model import predict_proba
    from tests.support import MlflowServer

    server = MlflowServer(project, NAME)
    try:
        test = load_split(project / paths.PREPARED_DIR, "test")
        body = json.dumps({"inputs": test.x[:16].astype(float).tolist()}).encode()
        status, out = http("POST", f"{server.url}/invocations", body, {"Content-Type": "application/json"})
        assert status == 200
        store = connect(load_params(project / "params.yaml"), project)
        model, _ = store.load_model(model_uri(NAME, _alias(project, "champion")))
        expected = predict_proba(model, test.x[:16]).argmax(1).tolist()
        assert np.asarray(out["predictions"]).argmax(1).tolist() == expected
    finally:
        server.stop()


def test_a_candidate_failing_infra_validation_is_not_registered_or_promoted(project, server):
    """Weights that change between evaluation and packaging (a corrupted or swapped artifact) must be caught
    by serving the packaged model from a fresh process, before the registry or the server see it."""
    versions, champion = _versions(project), _alias(project, "champion")
    set_param(project, "train.epochs", 0)
    run(["tollgate", "train"], cwd=project)
    untrained = (project / paths.MODEL_DIR / "model.pt").read_bytes()
    set_param(project, "train.epochs", 13)
    for stage in ("train", "evaluate"):
        run(["tollgate", stage], cwd=project)
    assert _report(project, paths.GATE_REPORT)["passed"]
    (project / paths.MODEL_DIR / "model.pt").write_bytes(untrained)

    run(["tollgate", "register"], cwd=project)
    registration = _report(project, paths.REGISTRATION)
    assert not registration["registered"]
    assert registration["reasons"][0].startswith(
        "infra validation failed: served predictions differ from evaluation"
    )
    run(["tollgate", "promote"], cwd=project)
    assert not _report(project, paths.PROMOTION)["promoted"]
    assert _versions(project) == versions and _alias(project, "champion") == champion
    assert http("GET", f"{server.url}/v2/models/{NAME}")[1]["versions"] == [champion]


def test_a_validation_failure_stops_the_chain_and_registers_nothing(project):
    versions = _versions(project)
    champion = _alias(project, "champion")
    set_param(project, "data.test_fraction", 0.001)  # rounds every class's test share down to zero images
    try:
        proc = run(["dvc", "repro"], cwd=project, check=False)
        assert proc.returncode != 0
        output = proc.stdout + proc.stderr
        assert "data validation failed" in output and "class 0 has 0 in test" in output
        assert "Running stage 'train'" not in output
        assert _versions(project) == versions and _alias(project, "champion") == champion
        summary = run(["tollgate", "summary"], cwd=project).stdout
        assert "validation  FAILED" in summary
    finally:
        set_param(project, "data.test_fraction", 0.2)
