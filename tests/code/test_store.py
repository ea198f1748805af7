"""Connecting to a project's tracking store is a per-call decision: a long-lived process (a Prefect worker
running deployments of two projects, a test session) must not carry the first project's store into the
next."""

from __future__ import annotations

import os

from pipeline.registry.store import connect, tracking_uri
from tests.support import shipped_params


def test_connecting_leaves_the_environment_as_the_user_set_it(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    params = shipped_params()
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()

    assert connect(params, first).uri == f"sqlite:///{first / 'mlflow.db'}"
    assert "MLFLOW_TRACKING_URI" not in os.environ
    assert "MLFLOW_REGISTRY_URI" not in os.environ
    # the next project's stages record into its own store, not the one this process saw first
    assert tracking_uri(params, second) == f"sqlite:///{second / 'mlflow.db'}"
    assert connect(params, second).uri == f"sqlite:///{second / 'mlflow.db'}"

    # a user's own choice still wins, and survives the connection
    shared = f"sqlite:///{tmp_path / 'shared.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", shared)
    assert connect(params, first).uri == shared
    assert os.environ["MLFLOW_TRACKING_URI"] == shared


# MLflow's own reading of its switch, the one is_telemetry_disabled() consults first (its other signals,
# CI and test markers, differ between machines and would decide the answer for it here).
TELEMETRY = (
    "import pipeline.registry.store, mlflow.environment_variables as e; "
    "print(e.MLFLOW_DISABLE_TELEMETRY.get(), __import__('os').environ.get('MLFLOW_DISABLE_TELEMETRY'))"
)


def test_mlflow_sends_no_usage_telemetry_from_a_users_shell_unless_they_turn_it_on():
    """A user's shell, as `make run` leaves it (DO_NOT_TRACK=1): MLflow's telemetry switch is off in every
    process that imports the registry package, and in the processes those start."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_DISABLE_TELEMETRY"}
    env["DO_NOT_TRACK"] = "1"

    def telemetry_disabled(**extra: str) -> str:
        cmd = [sys.executable, "-c", TELEMETRY]
        return subprocess.run(cmd, env={**env, **extra}, capture_output=True, text=True, check=True).stdout

    assert telemetry_disabled() == "True true\n"
    assert telemetry_disabled(MLFLOW_DISABLE_TELEMETRY="false") == "False false\n"  # the user's choice wins
