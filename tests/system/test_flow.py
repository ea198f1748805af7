"""The Prefect flow on a real (test-harness) Prefect server: same stages, same artifacts as `dvc repro`."""

import json

import pytest
import yaml

from tests.support import make_project, model_client, run, set_param, stop_process, tool_env

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


@pytest.fixture(scope="module")
def first_run(prefect_server, flow_project):
    """The flow's first, cold run in the project (state and published artifacts)."""
    from flows.pipeline import training_pipeline

    state = training_pipeline(root=str(flow_project), return_state=True)
    return state, _artifacts(state.state_details.flow_run_id)


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


def test_flow_gives_the_same_outcome_and_artifacts_as_dvc_repro(first_run, flow_project, cold_project):
    state, artifacts = first_run
    assert state.is_completed(), state.message
    assert state.message == "promoted v1"
    assert str(model_client(flow_project).get_model_version_by_alias(NAME, "champion").version) == "1"

    assert artifacts["gate"].startswith("## Gate: PASSED")
    assert "| accuracy |" in artifacts["gate"]
    assert f"models:/{NAME}/1" in artifacts["registration"]

    flow_outs = _outs((flow_project / "dvc.lock").read_text())
    repro_outs = _outs(cold_project["lock"])
    assert set(flow_outs) == set(repro_outs)
    assert {p: flow_outs[p] for p in DETERMINISTIC} == {p: repro_outs[p] for p in DETERMINISTIC}


def test_second_flow_run_skips_every_stage(first_run, flow_project):
    from flows.pipeline import training_pipeline

    lock = (flow_project / "dvc.lock").read_text()
    state = training_pipeline(root=str(flow_project), return_state=True)
    assert state.is_completed()
    assert state.message == "up to date, no stage ran (last outcome: promoted v1)"
    assert (flow_project / "dvc.lock").read_text() == lock
    assert len(model_client(flow_project).search_model_versions(f"name='{NAME}'")) == 1


def test_flow_fails_on_bad_data_with_the_cause_and_registers_nothing(first_run, flow_project):
    from flows.pipeline import training_pipeline

    versions = len(model_client(flow_project).search_model_versions(f"name='{NAME}'"))
    set_param(flow_project, "data.test_fraction", 0.001)
    try:
        state = training_pipeline(root=str(flow_project), return_state=True)
    finally:
        set_param(flow_project, "data.test_fraction", 0.2)
    assert state.is_failed()
    assert state.message.startswith("data validation failed: ")
    assert "class 4 has 0 in test" in state.message
    table = _artifacts(state.state_details.flow_run_id)["data-validation"]
    assert "class 4 has 0 in test" in table
    assert len(model_client(flow_project).search_model_versions(f"name='{NAME}'")) == versions


def test_rollback_flow_without_a_previous_champion_fails_and_says_why(first_run, flow_project):
    from flows.pipeline import rollback_flow

    state = rollback_flow(root=str(flow_project), return_state=True)
    assert state.is_failed()
    assert "no @previous version to roll back to" in state.message
    assert str(model_client(flow_project).get_model_version_by_alias(NAME, "champion").version) == "1"


@pytest.fixture(scope="module")
def webhook():
    """A real HTTP endpoint on 127.0.0.1 that records what notifications POST to it."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    received = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook", received
    server.shutdown()


def test_overrides_are_recorded_then_undone_after_a_rejection_which_is_notified(
    first_run, flow_project, webhook
):
    from flows.pipeline import training_pipeline

    url, received = webhook
    set_param(flow_project, "flow.notify_url", url)
    params_file = flow_project / "params.yaml"
    params_file.write_text(params_file.read_text().replace("  epochs: 15\n", "  epochs: 15  # a comment\n"))
    before = params_file.read_bytes()
    versions = len(model_client(flow_project).search_model_versions(f"name='{NAME}'"))
    state = training_pipeline(root=str(flow_project), params={"train.epochs": 1}, return_state=True)
    assert state.is_completed() and state.message.startswith("rejected: "), state.message
    # the run used the values exactly as `dvc exp run -S train.epochs=1` would: dvc.lock, the MLflow run
    # and the params artifact record them
    lock = yaml.safe_load((flow_project / "dvc.lock").read_text())
    assert lock["stages"]["train"]["params"]["params.yaml"]["train"]["epochs"] == 1
    run_id = json.loads((flow_project / "reports" / "train.json").read_text())["run_id"]
    assert model_client(flow_project).get_run(run_id).data.params["train.epochs"] == "1"
    assert "`train.epochs` = `1`" in _artifacts(state.state_details.flow_run_id)["params"]
    # ...and the experiment did not become the project's settings: params.yaml is back, byte for byte,
    # so the next scheduled run trains with the committed values (dvc status says train is stale)
    assert params_file.read_bytes() == before
    assert state.message.endswith(
        "overrides undone: params.yaml is as before this run (dvc status shows their effect)"
    )
    assert "train:" in run(["dvc", "status"], cwd=flow_project).stdout
    assert len(model_client(flow_project).search_model_versions(f"name='{NAME}'")) == versions
    assert received and received[-1]["text"].endswith(state.message)


def test_a_stage_past_its_timeout_is_stopped_and_nothing_moves(first_run, flow_project):
    from flows.pipeline import training_pipeline

    run(["dvc", "repro"], cwd=flow_project)  # whatever an earlier test left stale
    models = (flow_project / "models" / "model.pt").read_bytes()
    report = (flow_project / "reports" / "train.json").read_bytes()
    lock = (flow_project / "dvc.lock").read_text()
    state = training_pipeline(
        root=str(flow_project), params={"train.epochs": 400, "flow.timeout_s.train": 3}, return_state=True
    )
    assert state.is_failed()
    assert state.message.startswith("stage train timed out after 3 s (flow.timeout_s); overrides undone")
    # the lock still names the old outputs: the uncached report was never removed (persist), and DVC's
    # cache gives the model back as it was
    assert (flow_project / "dvc.lock").read_text() == lock
    assert (flow_project / "reports" / "train.json").read_bytes() == report
    run(["dvc", "checkout", "models"], cwd=flow_project)
    assert (flow_project / "models" / "model.pt").read_bytes() == models
    assert "epochs: 15" in (flow_project / "params.yaml").read_text()


def test_a_second_run_waits_for_the_checkout_lock_and_gives_up_with_a_reason(prefect_server, flow_project):
    from filelock import FileLock

    from flows.pipeline import training_pipeline
    from pipeline.core.paths import PIPELINE_LOCK

    set_param(flow_project, "flow.lock_timeout_s", 1)
    try:
        with FileLock(flow_project / PIPELINE_LOCK):  # what a run in progress holds
            state = training_pipeline(root=str(flow_project), return_state=True)
    finally:
        set_param(flow_project, "flow.lock_timeout_s", 3600)
    assert state.is_failed() and "another pipeline run holds .tollgate/pipeline.lock" in state.message


def test_overrides_that_make_the_champion_stay_in_params_yaml(first_run, flow_project):
    from flows.pipeline import training_pipeline

    run(["dvc", "repro"], cwd=flow_project)
    state = training_pipeline(root=str(flow_project), params={"train.epochs": 14}, return_state=True)
    assert state.is_completed() and state.message.startswith("promoted v"), state.message
    assert state.message.endswith("params.yaml keeps the overrides that made the champion (commit it)")
    assert yaml.safe_load((flow_project / "params.yaml").read_text())["train"]["epochs"] == 14
    assert "Data and pipelines are up to date" in run(["dvc", "status"], cwd=flow_project).stdout
    set_param(flow_project, "train.epochs", 15)


def test_a_killed_flows_stage_finishes_alone_and_the_next_run_waits_for_it(first_run, flow_project):
    """kill -9 of a flow orphans the stage it was running. The stage holds the checkout's stage lock, so
    the next run's train waits for it instead of resuming the same checkpoint into the same MLflow run."""
    import subprocess

    import psutil

    from flows.pipeline import training_pipeline

    set_param(flow_project, "train.epochs", 60)  # long enough to be killed half-way
    env = {**tool_env(flow_project), **_api_env()}
    flow = subprocess.Popen(
        ["tollgate", "flow"],
        cwd=flow_project,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        for line in flow.stdout:
            if line.startswith("[tollgate] epoch 2/"):
                break
        train = next(
            p for p in psutil.Process(flow.pid).children(recursive=True) if "train" in " ".join(p.cmdline())
        )
        flow.kill()  # the flow dies; its stage lives on, orphaned
        flow.wait()
        assert train.is_running()
        state = training_pipeline(root=str(flow_project), return_state=True)
        assert state.is_completed(), state.message
        assert not train.is_running()  # the new run waited for it to end
    finally:
        set_param(flow_project, "train.epochs", 15)
        if flow.poll() is None:
            flow.kill()
    client = model_client(flow_project)
    experiment = client.get_experiment_by_name("tollgate").experiment_id
    for mlflow_run in client.search_runs([experiment]):
        steps = [m.step for m in client.get_metric_history(mlflow_run.info.run_id, "val_loss")]
        assert len(steps) == len(set(steps)), f"run {mlflow_run.info.run_id} logged epochs twice: {steps}"


def _api_env() -> dict[str, str]:
    from prefect.settings import PREFECT_API_URL

    return {"PREFECT_API_URL": PREFECT_API_URL.value()}


def test_prefect_yaml_deployments_get_their_cron_schedules(prefect_server, flow_project):
    from prefect.client.orchestration import get_client

    git_url = "https://git.example.com/team/tollgate.git"
    env = {**_api_env(), "PWD": str(flow_project), "TOLLGATE_GIT_URL": git_url}  # as a shell in the project
    for pool in ("tollgate-process", "tollgate-team"):
        run(["prefect", "work-pool", "create", pool, "--type", "process"], cwd=flow_project, **env)
    run(["prefect", "--no-prompt", "deploy", "--all"], cwd=flow_project, **env)
    spec = yaml.safe_load((flow_project / "prefect.yaml").read_text())
    with get_client(sync_client=True) as client:
        for d in spec["deployments"]:
            named = {
                "training_pipeline": "training-pipeline",
                "drift_check": "drift-check",
                "canary_rollout": "canary-rollout",
            }
            flow_name = named.get(
                d["entrypoint"].split(":")[1], d["entrypoint"].split(":")[1].removesuffix("_flow")
            )
            got = client.read_deployment_by_name(f"{flow_name}/{d['name']}")
            assert got.work_pool_name == d["work_pool"]["name"]
            assert got.parameters == d.get("parameters", {})
            crons = [(s.schedule.cron, s.schedule.timezone, s.active) for s in got.schedules]
            assert crons == [
                (s["cron"], s["timezone"], s.get("active", True)) for s in d.get("schedules", [])
            ]
            if "pull" in d:  # the team variant: a fresh clone of the repository, then the data from DVC
                clone = got.pull_steps[0]["prefect.deployments.steps.git_clone"]
                assert clone["repository"] == git_url
                assert (
                    "tollgate data pull"
                    in got.pull_steps[1]["prefect.deployments.steps.run_shell_script"]["script"]
                )
            else:  # the others run in this checkout
                step = got.pull_steps[0]["prefect.deployments.steps.set_working_directory"]
                assert step["directory"] == str(flow_project)


def _deployed(name: str) -> bool:
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_deployment_by_name(name)
        except ObjectNotFound:
            return False
    return True


def test_a_deployment_run_is_picked_up_by_the_served_process(prefect_server, flow_project):
    import subprocess
    import time

    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    with get_client(sync_client=True) as client:  # a team without workers: no `prefect deploy` ones
        for deployment in client.read_deployments():
            client.delete_deployment(deployment.id)
    log = open(flow_project / "schedule.log", "w")  # noqa: SIM115 - closed below
    served = subprocess.Popen(
        ["tollgate", "schedule"], cwd=flow_project, env={**tool_env(), **_api_env()}, stdout=log, stderr=log
    )
    try:
        deadline = time.monotonic() + 180
        while not _deployed("training-pipeline/nightly-retrain"):  # the served process registers it
            assert served.poll() is None and time.monotonic() < deadline, (
                flow_project / "schedule.log"
            ).read_text()
            time.sleep(1)
        flow_run = run_deployment("training-pipeline/nightly-retrain", timeout=300)
        assert flow_run.state.is_completed(), flow_run.state.message
        assert flow_run.deployment_id is not None and flow_run.state.message  # says what it decided
    finally:
        stop_process(served)
        log.close()
