"""The Prefect flow on a real (test-harness) Prefect server: same stages, same artifacts as `dvc repro`."""

import pytest
import yaml

from tests.support import make_project, model_client, set_param

pytestmark = pytest.mark.slow
NAME = "tollgate-classifier"
# Outputs that depend only on data, params and code (not on MLflow run ids or wall time).
DETERMINISTIC = {
    "data/prepared",
    "reports/validation.json",
    "models",
    "metrics/eval.json",
    "plots/confusion.csv",
}


@pytest.fixture(scope="module")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def flow_project(tmp_path_factory):
    return make_project(tmp_path_factory.mktemp("flow") / "project")


def _artifacts(flow_run_id) -> dict[str, str]:
    """Artifacts the flow run published, by key (tables come back as JSON text)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return {a.key: str(a.data) for a in found}


def _outs(lock_text: str) -> dict[str, str]:
    lock = yaml.safe_load(lock_text)
    return {out["path"]: out["md5"] for stage in lock["stages"].values() for out in stage.get("outs", [])}


def test_flow_gives_the_same_outcome_and_artifacts_as_dvc_repro(prefect_server, flow_project, cold_project):
    from flows.pipeline import training_pipeline

    state = training_pipeline(root=str(flow_project), return_state=True)
    assert state.is_completed(), state.message
    assert state.message == "promoted v1"
    assert str(model_client(flow_project).get_model_version_by_alias(NAME, "champion").version) == "1"

    artifacts = _artifacts(state.state_details.flow_run_id)
    assert artifacts["gate"].startswith("## Gate: PASSED")
    assert "| accuracy |" in artifacts["gate"]
    assert f"models:/{NAME}/1" in artifacts["registration"]

    flow_outs = _outs((flow_project / "dvc.lock").read_text())
    repro_outs = _outs(cold_project["lock"])
    assert set(flow_outs) == set(repro_outs)
    assert {p: flow_outs[p] for p in DETERMINISTIC} == {p: repro_outs[p] for p in DETERMINISTIC}


def test_second_flow_run_skips_every_stage(prefect_server, flow_project):
    from flows.pipeline import training_pipeline

    lock = (flow_project / "dvc.lock").read_text()
    state = training_pipeline(root=str(flow_project), return_state=True)
    assert state.is_completed()
    assert state.message == "up to date, no stage ran (last outcome: promoted v1)"
    assert (flow_project / "dvc.lock").read_text() == lock
    assert len(model_client(flow_project).search_model_versions(f"name='{NAME}'")) == 1


def test_flow_fails_on_bad_data_with_the_cause_and_registers_nothing(prefect_server, flow_project):
    from flows.pipeline import training_pipeline

    set_param(flow_project, "data.test_fraction", 0.001)
    state = training_pipeline(root=str(flow_project), return_state=True)
    assert state.is_failed()
    assert state.message.startswith("data validation failed: ")
    assert "class 4 has 0 in test" in state.message
    table = _artifacts(state.state_details.flow_run_id)["data-validation"]
    assert "class 4 has 0 in test" in table
    assert len(model_client(flow_project).search_model_versions(f"name='{NAME}'")) == 1


def test_rollback_flow_without_a_previous_champion_fails_and_says_why(prefect_server, flow_project):
    from flows.pipeline import rollback_flow

    state = rollback_flow(root=str(flow_project), return_state=True)
    assert state.is_failed()
    assert "no @previous version to roll back to" in state.message
    assert str(model_client(flow_project).get_model_version_by_alias(NAME, "champion").version) == "1"
