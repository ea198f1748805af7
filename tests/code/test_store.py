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
