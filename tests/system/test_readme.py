"""Every request example in the README and in docs/serving.md, run as written (curl, from the project
folder) against a real `tollgate serve`; the ones the README says MLflow's scoring server answers too, also
against `mlflow models serve` of the same version, with the same predictions. Docs and servers cannot drift
apart."""

from __future__ import annotations

import json
import os
import re
import subprocess

import numpy as np
import pytest

from tests.support import ROOT, MlflowServer, Server, champion_back, run, tool_env

pytestmark = pytest.mark.slow
NAME = "tollgate-classifier"
DOCUMENTED = "http://127.0.0.1:8765"


def _commands(text: str) -> list[tuple[str, bool]]:
    """(curl command, whether MLflow's server answers it too) for every example aimed at the documented
    address; a block whose first line says `mlflow models serve` both answer counts for both."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        both = block.startswith("#") and "mlflow models serve both" in block.splitlines()[0]
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            command = line.split("  #")[0].strip()
            if command.startswith("curl") and DOCUMENTED in command:
                found.append((command, both))
    return found


README = _commands((ROOT / "README.md").read_text())
SERVING = _commands((ROOT / "docs" / "serving.md").read_text())


def test_the_examples_are_found():
    paths = {re.search(r"8765(/[\w/.-]*)", c).group(1) for c, _ in README}
    assert {"/invocations", "/ping", "/version", "/predict", "/metrics"} <= paths
    assert sum(both for _, both in README) == 3


@pytest.fixture(scope="module")
def servers(two_versions, tmp_path_factory):
    """`tollgate serve` and `mlflow models serve` on the same @champion, and curl set up to report the
    status it got (its own rc file: every example runs as written)."""
    champion_back(two_versions)
    run(["tollgate", "samples", "--out", "samples"], cwd=two_versions)
    home = tmp_path_factory.mktemp("curl")
    (home / ".curlrc").write_text('silent\nshow-error\nwrite-out = "\\n%{http_code}"\n')
    ours, theirs = Server(two_versions), MlflowServer(two_versions, NAME)
    yield two_versions, home, ours, theirs
    ours.stop()
    theirs.stop()


def _curl(command: str, url: str, project, home) -> tuple[int, str]:
    env = {**tool_env(project), "CURL_HOME": str(home), "HOME": str(home)}
    proc = subprocess.run(
        ["bash", "-c", command.replace(DOCUMENTED, url)], cwd=project, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    body, _, status = proc.stdout.rpartition("\n")
    return int(status), body


@pytest.mark.parametrize(("command", "both"), README + SERVING, ids=[c[:70] for c, _ in README + SERVING])
def test_a_documented_request_answers_as_documented(servers, command, both):
    project, home, ours, theirs = servers
    status, body = _curl(command, ours.url, project, home)
    assert status == 200, body
    if not both:
        return
    their_status, their_body = _curl(command, theirs.url, project, home)
    assert their_status == 200, their_body
    if "/invocations" in command:
        mine, mlflows = json.loads(body)["predictions"], json.loads(their_body)["predictions"]
        assert np.asarray(mine).shape == np.asarray(mlflows).shape == (1, 10)
        assert np.allclose(mine, mlflows, atol=1e-5)
    else:
        assert body == their_body  # /ping's newline, /version's MLflow version


def test_the_pyfunc_model_takes_the_uint8_pixels_prepare_writes(servers):
    """`mlflow.pyfunc.load_model(...@champion).predict` on the arrays in data/prepared, as they are."""
    project = servers[0]
    script = (
        "import mlflow, numpy as np\n"
        "from pipeline.data.prepared import load_split\n"
        f"mlflow.set_tracking_uri('sqlite:///{project}/mlflow.db')\n"
        f"model = mlflow.pyfunc.load_model('models:/{NAME}@champion')\n"
        "x = np.asarray(load_split('data/prepared', 'test').x[:8])\n"
        "assert x.dtype == np.uint8, x.dtype\n"
        "print(model.predict(x).shape)\n"
        "try:\n"
        "    model.predict(x.astype(np.float32))\n"
        "except Exception as err:\n"
        "    print('float32:', err)\n"
    )
    out = subprocess.run(
        ["python", "-c", script],
        cwd=project,
        env=tool_env(project),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "(8, 10)" in out
    assert "dtype of input float32 does not match expected dtype uint8" in out
    assert os.environ.get("MLFLOW_TRACKING_URI") is None
