"""DVC experiments are not production: `dvc exp run` (in the workspace, or queued and run by `dvc queue
start` in a temporary copy) trains, evaluates and registers into the project's own registry, with the
experiment's name, baseline and params diff on the version and an alias of its own, but never moves
@champion and never reloads the running server; `tollgate promote --version N` then promotes it on purpose,
verified like any promotion."""

from __future__ import annotations

import contextlib
import json
import subprocess
import time

import psutil
import pytest

from tests.support import Server, http, make_project, model_client, run, tool_env

pytestmark = pytest.mark.slow
NAME = "tollgate-classifier"


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    project = make_project(tmp_path_factory.mktemp("experiments") / "project")
    run(["dvc", "repro"], cwd=project)
    assert _alias(project, "champion") == "1"
    return project


@pytest.fixture(scope="module")
def server(project):
    srv = Server(project)
    yield srv
    srv.stop()


def _alias(project, alias: str) -> str:
    return str(model_client(project).get_model_version_by_alias(NAME, alias).version)


def _served(server) -> list[str]:
    return http("GET", f"{server.url}/v2/models/{NAME}")[1]["versions"]


def _of_experiment(project, name: str):
    found = [
        mv
        for mv in model_client(project).search_model_versions(f"name='{NAME}'")
        if mv.tags.get("experiment") == name
    ]
    assert len(found) == 1, [mv.tags for mv in model_client(project).search_model_versions(f"name='{NAME}'")]
    return found[0]


def test_an_experiment_registers_its_version_and_leaves_production_alone(project, server):
    baseline = run(["git", "rev-parse", "HEAD"], cwd=project).stdout.strip()
    out = run(["dvc", "exp", "run", "-n", "fewer-epochs", "-S", "train.epochs=13"], cwd=project)
    assert "experiment fewer-epochs: not promoted" in out.stdout + out.stderr
    mv = _of_experiment(project, "fewer-epochs")
    assert mv.tags["experiment_baseline"] == baseline
    assert json.loads(mv.tags["experiment_params"]) == {"train.epochs": [15, 13]}
    assert _alias(project, "exp-fewer-epochs") == str(mv.version)
    assert _alias(project, "champion") == "1" and _alias(project, "challenger") == "1"
    assert _served(server) == ["1"]
    promotion = json.loads((project / "reports" / "promotion.json").read_text())
    assert not promotion["promoted"] and promotion["experiment"] == "fewer-epochs"
    assert f"tollgate promote --version {mv.version}" in promotion["reason"]
    shown = run(["dvc", "exp", "show", "--only-changed", "--md"], cwd=project).stdout
    assert "fewer-epochs" in shown and "train.epochs" in shown
    diff = run(["dvc", "exp", "diff", "HEAD", "fewer-epochs"], cwd=project).stdout
    assert "train.epochs" in diff
    run(["git", "checkout", "--", "."], cwd=project)  # the workspace back to the committed baseline


def _start_queue(project) -> None:
    """`dvc queue start`, its output to a file: the worker it leaves running inherits the command's output,
    so through a pipe the command would not return until the worker exits. That worker's own monitor
    thread, which stops it once the queue is empty, can die on a half-written message file of kombu's
    filesystem transport (seen here: JSONDecodeError; treeverse/dvc#10398, #10428, open), and then it
    never exits."""
    with open(project / "queue-start.log", "w") as log:
        subprocess.run(["dvc", "queue", "start", "-j", "1"], cwd=project, env=tool_env(project),
                       stdout=log, stderr=subprocess.STDOUT, check=True)  # fmt: skip


def _stop_queue(project) -> None:
    """`dvc queue stop`, then the worker this test started, by the pid DVC recorded, if it is still up."""
    run(["dvc", "queue", "stop"], cwd=project, check=False)
    for pid_file in (project / ".dvc" / "tmp" / "exps" / "celery").glob("dvc-exp-worker-*.pid"):
        with contextlib.suppress(ValueError, psutil.Error):  # gone already
            worker = psutil.Process(int(pid_file.read_text().split()[0]))
            if "queue-worker" not in " ".join(worker.cmdline()):
                continue  # the pid is someone else's by now
            try:
                worker.wait(timeout=60)
            except psutil.TimeoutExpired:
                worker.kill()


def test_a_queued_experiment_runs_in_a_copy_and_records_into_the_projects_registry(project, server):
    run(["dvc", "exp", "run", "--queue", "-n", "queued-run", "-S", "train.epochs=14"], cwd=project)
    _start_queue(project)
    try:
        deadline = time.monotonic() + 900
        while True:
            status = run(["dvc", "queue", "status"], cwd=project).stdout
            line = next((ln for ln in status.splitlines() if "queued-run" in ln), "")
            if "Success" in line or "Failed" in line:
                break
            assert time.monotonic() < deadline, status
            time.sleep(2)
    finally:
        _stop_queue(project)
    logs = run(["dvc", "queue", "logs", "queued-run"], cwd=project, check=False).stdout
    assert "Success" in line, logs
    mv = _of_experiment(project, "queued-run")  # in the project's own mlflow.db, not the copy's
    assert json.loads(mv.tags["experiment_params"]) == {"train.epochs": [15, 14]}
    assert _alias(project, "exp-queued-run") == str(mv.version)
    assert _alias(project, "champion") == "1" and _served(server) == ["1"]
    assert not (project / ".dvc" / "tmp" / "exps" / "mlflow.db").exists()


def test_promoting_an_experiments_version_on_purpose_is_verified_like_any_promotion(project, server):
    mv = _of_experiment(project, "fewer-epochs")
    version = str(mv.version)
    # an experiment's params were not committed when it ran: a team that requires a clean checkout refuses it
    assert mv.tags["git_dirty"] == "true"
    strict = run(
        ["tollgate", "promote", "--version", version], cwd=project, check=False, TOLLGATE_REQUIRE_CLEAN="true"
    )
    assert strict.returncode == 1 and "built from uncommitted code or params" in strict.stderr
    assert _alias(project, "champion") == "1"
    out = run(["tollgate", "promote", "--version", version], cwd=project).stdout
    assert f"@champion → {NAME} v{version} (was v1)" in out and f"{server.url} serves it, verified" in out
    assert _alias(project, "champion") == version and _served(server) == [version]
    assert _alias(project, "previous") == "1"
    refused = run(["tollgate", "promote", "--version", "999"], cwd=project, check=False)
    assert refused.returncode == 1 and "has no version 999" in refused.stderr
