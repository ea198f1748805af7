"""Serving artefacts as a user turns them on: `serve.runtime: onnx` in params.yaml, the pipeline through
register, and a real `tollgate serve` answering from ONNX Runtime, compared with eager torch on the test
split; that server never loads torch (its memory maps no libtorch). An int8 artefact made to disagree (a
failpoint in its session) is refused by its gate and the version serves on torch. TorchServe, from the
archive `tollgate deploy` builds, answers from the same ONNX artefact."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.core import paths
from pipeline.data.prepared import load_split
from pipeline.training import model as model_io
from tests.support import Server, TorchServe, http, make_project, model_client, run, set_param

pytestmark = pytest.mark.slow
NAME = "tollgate-classifier"


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    project = make_project(tmp_path_factory.mktemp("runtimes") / "project")
    set_param(project, "serve.runtime", "onnx")
    run(["dvc", "repro", "register"], cwd=project)
    return project


def _registration(project) -> dict:
    return json.loads((project / paths.REGISTRATION).read_text())


def _served(project, registration: dict):
    server = Server(project, args=("--model-uri", registration["model_uri"]))
    status, meta = http("GET", f"{server.url}/v2/models/{NAME}")
    if status != 200:
        server.stop()
        raise AssertionError(meta)
    return server, meta


def _loaded_torch(server) -> bool:
    """Whether the server process has torch's C++ library mapped: imported torch, once, anywhere."""
    return "libtorch_cpu" in (Path("/proc") / str(server.proc.pid) / "maps").read_text()


def test_an_onnx_artefact_that_passes_its_gate_serves_and_predicts_as_eager_torch(project):
    reg = _registration(project)
    assert reg["runtime"] == "onnx"
    (row,) = reg["runtimes"]
    assert row["runtime"] == "onnx" and row["passed"] and row["agreement"] >= 0.995
    assert row["p50_ms"] < row["eager_p50_ms"]
    version = model_client(project).get_model_version(NAME, reg["version"])
    assert version.tags["runtime"] == "onnx" and "## Serving runtime: onnx" in version.description

    test = load_split(project / paths.PREPARED_DIR, "test")
    # Fractional pixels, which MLflow's scoring JSON allows: both runtimes must see the same values
    x = np.asarray(test.x[:128]).astype(np.float32) * 0.99 + 0.3
    eager_model, _ = model_io.load(project / paths.MODEL_DIR)
    eager = model_io.predict_proba(eager_model, torch.from_numpy(x)).numpy()
    server, meta = _served(project, reg)
    try:
        assert meta["parameters"]["runtime"] == "onnx" and meta["platform"] == "onnxruntime_onnx"
        body = json.dumps({"inputs": x.tolist()}).encode()
        status, out = http("POST", f"{server.url}/invocations", body, {"Content-Type": "application/json"})
        torch_loaded = _loaded_torch(server)
    finally:
        server.stop()
    assert status == 200, out
    assert not torch_loaded
    served = np.asarray(out["predictions"])
    assert (served.argmax(1) == eager.argmax(1)).all()
    np.testing.assert_allclose(served, eager, atol=1e-4)


def test_torchserve_answers_from_the_gated_onnx_artefact_like_eager_torch(project):
    reg = _registration(project)
    assert reg["runtime"] == "onnx"
    model_client(project).set_registered_model_alias(NAME, "champion", reg["version"])
    x = np.asarray(load_split(project / paths.PREPARED_DIR, "test").x[:64])
    eager_model, _ = model_io.load(project / paths.MODEL_DIR)
    eager = model_io.predict_proba(eager_model, x).numpy()
    ts = TorchServe(project, token_auth=False)
    try:
        status, out = ts.predict(json.dumps({"inputs": x.tolist()}).encode())
        archive = ts.folder / "model-store" / f"{NAME}_v{reg['version']}.mar"
        with zipfile.ZipFile(archive) as mar:
            shipped = set(mar.namelist())
    finally:
        ts.stop()
    assert {"model.onnx", "runtimes.json"} <= shipped
    assert status == 200 and out["runtime"] == "onnx" and out["version"] == reg["version"], out
    served = np.asarray(out["predictions"])
    assert (served.argmax(1) == eager.argmax(1)).all()
    np.testing.assert_allclose(served, eager, atol=1e-4)


def test_an_int8_artefact_that_disagrees_is_refused_and_the_version_serves_on_torch(project):
    set_param(project, "serve.runtime", "onnx-int8")
    try:
        for stage in ("train", "evaluate"):  # a new training run: register makes one version per run
            run(["tollgate", stage], cwd=project)
        run(["tollgate", "register"], cwd=project, TOLLGATE_FAILPOINT="runtime:int8-disagrees:on")
    finally:
        set_param(project, "serve.runtime", "onnx")
    reg = _registration(project)
    assert reg["registered"] and reg["runtime"] == "torch"
    rows = {r["runtime"]: r for r in reg["runtimes"]}
    assert rows["onnx"]["passed"] and not rows["onnx-int8"]["passed"]
    assert rows["onnx-int8"]["agreement"] < 0.5
    assert any("gate.min_agreement" in reason for reason in rows["onnx-int8"]["reasons"])
    version = model_client(project).get_model_version(NAME, reg["version"])
    assert version.tags["runtime"] == "torch" and "## Serving runtime: torch" in version.description
    server, meta = _served(project, reg)
    torch_loaded = _loaded_torch(server)
    server.stop()
    assert meta["parameters"]["runtime"] == "torch" and meta["platform"] == "pytorch" and torch_loaded
