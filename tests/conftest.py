"""Shared fixtures. Tests run real components: DVC in a temp copy of the repo, MLflow on a temp SQLite
store, a real Prefect server, a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support import ROOT, make_project, run, tool_env, two_version_project

# Stage commands (`tollgate <stage>`) run as subprocesses of DVC, also when the flow calls DVC in-process.
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("MLFLOW_REGISTRY_URI", None)
os.environ.update(tool_env())
# The usual umask, whatever the CI shell has: tests check that outputs are readable by other users.
os.umask(0o022)


# Modules that share a session fixture that runs the pipeline, by that fixture: one worker builds it once
# for all of them.
SHARED_PROJECTS = {
    "two_versions": {
        "test_serve",
        "test_promotion",
        "test_replicas",
        "test_torchserve",
        "test_clients",
        "test_readme",
        "test_canary",
    },
    # test_flow compares the flow's outputs with cold_project's: on another worker it would build its own
    "cold_project": {"test_pipeline", "test_flow"},
}
GROUP_OF = {module: group for group, modules in SHARED_PROJECTS.items() for module in modules}


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the marks into the node ids
def pytest_collection_modifyitems(items) -> None:
    """Under pytest-xdist (`--dist loadgroup`), a module's tests stay on one worker: their module-scoped
    fixtures (a project, a server, the team stack) are built once, and so are the session fixtures of
    SHARED_PROJECTS. Everything under tests/system/ is marked `system` (real servers, `dvc repro`):
    `make test-fast` leaves it out."""
    for item in items:
        module = item.module.__name__.rpartition(".")[2]
        item.add_marker(pytest.mark.xdist_group(GROUP_OF.get(module, module)))
        if item.module.__name__.startswith("tests.system."):
            item.add_marker(pytest.mark.system)


@pytest.fixture(scope="session")
def prepared_digits(tmp_path_factory) -> Path:
    """The default dataset prepared once, for tests of the steps that read it."""
    from pipeline.core.config import load_params
    from pipeline.data.prepared import prepare

    params = load_params(ROOT / "params.yaml")
    out = tmp_path_factory.mktemp("prepared") / "prepared"
    prepare(params.data, params.seed, out)
    return out


@pytest.fixture(scope="session")
def cold_project(tmp_path_factory) -> dict:
    """A fresh copy of the repo after one cold `dvc repro`, with a snapshot of its lock file at that point
    (tests may go on to change the project)."""
    project = make_project(tmp_path_factory.mktemp("cold") / "project")
    proc = run(["dvc", "repro"], cwd=project)
    return {"path": project, "output": proc.stdout + proc.stderr, "lock": (project / "dvc.lock").read_text()}


@pytest.fixture(scope="session")
def two_versions(tmp_path_factory) -> Path:
    """A project after two pipeline runs (v2 @champion, v1 @previous), shared by the serving and promotion
    tests: each of those puts @champion back on v2 (and @previous on v1) before it starts."""
    return two_version_project(tmp_path_factory.mktemp("two-versions") / "project")
