"""The Open Inference Protocol as its own clients speak it: Triton's `tritonclient.http` and the KServe
SDK's `InferenceRESTClient`, unmodified, in a virtual environment of their own (tests/clients), drive a
real `tollgate serve` in JSON and with the binary tensor data extension, and get the predictions
`/invocations` gives for the same images."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.core import paths
from tests.support import ROOT, Server, champion_back, http

pytestmark = pytest.mark.slow
NAME = "tollgate-classifier"
CLIENTS = Path(sys.executable).parent.parent / "clients" / "bin" / "python"  # .venv/clients (Makefile)


@pytest.fixture(scope="module")
def served(two_versions, tmp_path_factory):
    """v2 @champion served, 16 test images as uint8, and what /invocations answers for them."""
    from pipeline.data.prepared import load_split

    champion_back(two_versions)
    x = np.asarray(load_split(two_versions / paths.PREPARED_DIR, "test").x[:16], dtype=np.uint8)
    pixels = tmp_path_factory.mktemp("clients") / "pixels.npy"
    np.save(pixels, x)
    server = Server(two_versions)
    status, scored = http(
        "POST",
        f"{server.url}/invocations",
        json.dumps({"inputs": x.tolist()}).encode(),
        {"Content-Type": "application/json"},
    )
    assert status == 200
    yield server, pixels, np.asarray(scored["predictions"])
    server.stop()


def _client(script: str, server: Server, pixels: Path, mode: str) -> dict:
    proc = subprocess.run(
        [str(CLIENTS), str(ROOT / "tests" / "clients" / script), server.url, NAME, str(pixels), mode],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


def test_the_client_environment_is_the_ecosystems_own():
    assert CLIENTS.is_file(), "make test builds .venv/clients from tests/clients/requirements.txt"
    out = subprocess.run(
        [
            str(CLIENTS),
            "-c",
            "import importlib.metadata as m; print(m.version('tritonclient'), m.version('kserve'))",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert out[0].startswith("2.") and out[1].startswith("0.")


@pytest.mark.parametrize("mode", ["json", "binary"])
def test_tritons_client_infers_like_invocations(served, mode):
    server, pixels, expected = served
    out = _client("triton.py", server, pixels, mode)
    assert out["live"] and out["ready"] and out["model_ready"] and out["version_ready"]
    assert out["version"] == "2" and "binary_tensor_data" in out["extensions"]
    assert np.allclose(out["probs"], expected, atol=1e-6) and np.allclose(
        out["probs_versioned"], expected, atol=1e-6
    )
    assert out["error"]["status"] == "404" and "version '999' is not served" in out["error"]["message"]


@pytest.mark.parametrize("mode", ["json", "binary"])
def test_the_kserve_sdk_infers_like_invocations(served, mode):
    server, pixels, expected = served
    out = _client("kserve_sdk.py", server, pixels, mode)
    assert out["live"] and out["ready"] and out["model_ready"]
    assert np.allclose(out["probs"], expected, atol=1e-6)
    assert out["binary_reply"] is (mode == "binary")
    assert "unknown model 'no-such-model'" in out["error"] and "404" in out["error"]
