"""The train stage as DVC runs it (`tollgate train`, its own process): killed with SIGKILL mid-way and
re-run, it must finish exactly like an uninterrupted run; under torchrun with two gloo processes, on one
node or on two meeting at a c10d rendezvous, it must train a model as good as one process does, logged once,
and the two layouts the same model."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest
import torch

from pipeline.core import paths
from pipeline.data.prepared import load_split
from pipeline.training import model as model_io
from tests.support import free_port, make_project, model_client, run, set_param, tool_env

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A fresh copy of the repo with prepared and validated digits, and one uninterrupted training."""
    project = make_project(tmp_path_factory.mktemp("training") / "project")
    run(["dvc", "repro", "validate"], cwd=project)
    run(["tollgate", "train"], cwd=project)
    reference = project.parent / "reference"
    shutil.copytree(project / paths.MODEL_DIR, reference / "models")
    shutil.copy(project / paths.TRAIN_REPORT, reference / "train.json")
    return project


def _weights(folder):
    return torch.load(folder / model_io.WEIGHTS, weights_only=True)


def _test_accuracy(model_dir, project) -> float:
    model, _ = model_io.load(model_dir)
    test = load_split(project / paths.PREPARED_DIR, "test")
    return float((model_io.predict_proba(model, test.x).argmax(1).numpy() == test.y).mean())


def _kill_after_epoch(project, epoch: int) -> None:
    """Start `tollgate train` and SIGKILL it as soon as it reports `epoch`."""
    proc = subprocess.Popen(
        ["tollgate", "train"],
        cwd=project,
        env=tool_env(project),
        stdout=subprocess.PIPE,
        text=True,
        bufsize=1,
    )
    for line in proc.stdout:
        if line.startswith(f"[tollgate] epoch {epoch}/"):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


def test_a_killed_run_resumes_and_ends_like_an_uninterrupted_one(project):
    reference = project.parent / "reference"
    shutil.rmtree(project / paths.MODEL_DIR)
    _kill_after_epoch(project, 5)
    # Nothing DVC or the registry could take for a finished model; the checkpoint is there to resume.
    assert not (project / paths.MODEL_DIR).exists()
    assert (project / paths.TRAIN_CHECKPOINT).exists()
    killed_run = torch.load(project / paths.TRAIN_CHECKPOINT, weights_only=True)["extra"]["run_id"]

    out = run(["tollgate", "train"], cwd=project).stdout
    assert "resuming from the checkpoint after epoch" in out
    report = json.loads((project / paths.TRAIN_REPORT).read_text())
    expected = json.loads((reference / "train.json").read_text())
    assert report["resumed_from"] >= 5 and report["run_id"] == killed_run
    assert report["val_loss"] == pytest.approx(expected["val_loss"], abs=1e-6)
    assert report["val_accuracy"] == expected["val_accuracy"]
    for name, tensor in _weights(reference / "models").items():
        torch.testing.assert_close(_weights(project / paths.MODEL_DIR)[name], tensor, rtol=1e-5, atol=1e-6)
    assert not (project / paths.TRAIN_CHECKPOINT).exists()  # finished: the next run starts afresh
    steps = {m.step for m in model_client(project).get_metric_history(killed_run, "val_loss")}
    assert steps == set(range(1, report["epochs"] + 1))  # one continuous history in one MLflow run


def test_a_checkpoint_from_other_settings_is_not_resumed(project):
    shutil.rmtree(project / paths.MODEL_DIR)
    _kill_after_epoch(project, 3)
    set_param(project, "train.lr", 0.002)
    out = run(["tollgate", "train"], cwd=project).stdout
    assert "resuming" not in out
    assert json.loads((project / paths.TRAIN_REPORT).read_text())["resumed_from"] == 0
    set_param(project, "train.lr", 0.003)


def test_training_runs_carry_system_metrics(project):
    """MLflow samples CPU and memory (GPU where there is one) while training runs. Its monitor drops a
    sampling window cut short by the run's end, so this run samples often enough to be seen."""
    set_param(project, "mlflow.system_metrics_s", 0.2)
    try:
        run(["tollgate", "train"], cwd=project)
    finally:
        set_param(project, "mlflow.system_metrics_s", 2.0)
    run_id = json.loads((project / paths.TRAIN_REPORT).read_text())["run_id"]
    metrics = model_client(project).get_run(run_id).data.metrics
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(metrics)


def test_an_unreadable_checkpoint_is_discarded_and_training_starts_afresh(project):
    _kill_after_epoch(project, 3)
    checkpoint = project / paths.TRAIN_CHECKPOINT
    checkpoint.write_bytes(checkpoint.read_bytes()[:4096])  # truncated, as by a full disk
    out = run(["tollgate", "train"], cwd=project).stdout
    assert "discarding unreadable checkpoint" in out
    assert json.loads((project / paths.TRAIN_REPORT).read_text())["resumed_from"] == 0
    assert not checkpoint.exists()


def test_a_checkpoint_whose_mlflow_run_was_deleted_starts_afresh(project):
    _kill_after_epoch(project, 3)
    killed_run = torch.load(project / paths.TRAIN_CHECKPOINT, weights_only=True)["extra"]["run_id"]
    model_client(project).delete_run(killed_run)  # someone cleaned up the experiment in the MLflow UI
    out = run(["tollgate", "train"], cwd=project).stdout
    assert f"its MLflow run {killed_run} was deleted" in out
    report = json.loads((project / paths.TRAIN_REPORT).read_text())
    assert report["resumed_from"] == 0 and report["run_id"] != killed_run


def test_a_checkpoint_is_not_resumed_by_changed_code(project):
    """Resuming the old network's weights into edited model code would register a model nobody trained."""
    _kill_after_epoch(project, 3)
    model_code = project / "pipeline" / "training" / "model.py"
    original = model_code.read_text()
    model_code.write_text(original + "\n# edited after the kill\n")
    try:
        out = run(["tollgate", "train"], cwd=project).stdout
    finally:
        model_code.write_text(original)
    assert "resuming" not in out
    assert json.loads((project / paths.TRAIN_REPORT).read_text())["resumed_from"] == 0


def test_a_stage_killed_under_dvc_repro_leaves_its_last_reports_and_resumes(project):
    """DVC removes a stage's outputs before running it; the uncached ones (reports, plots) could never be
    restored. They persist: a killed train leaves the previous ones, which the lock file still names."""
    import psutil

    run(["dvc", "repro", "train"], cwd=project)  # the lock file names the current outputs
    reports = {rel: (project / rel).read_bytes() for rel in (paths.TRAIN_REPORT, paths.TRAIN_HISTORY)}
    set_param(project, "train.epochs", 16)
    try:
        proc = subprocess.Popen(
            ["dvc", "repro", "train"],
            cwd=project,
            env=tool_env(project),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        for line in proc.stdout:
            if line.startswith("[tollgate] epoch 3/"):
                for child in psutil.Process(proc.pid).children(recursive=True):
                    child.kill()  # the stage process, not DVC
                break
        proc.communicate(timeout=120)
        assert proc.returncode != 0
        assert {rel: (project / rel).read_bytes() for rel in reports} == reports
        run(["dvc", "checkout", "models"], cwd=project)  # the cached output comes back from DVC's cache
        assert (project / paths.MODEL_DIR / model_io.WEIGHTS).exists()
        out = run(["dvc", "repro", "train"], cwd=project).stdout
        assert "resuming from the checkpoint after epoch" in out
        assert json.loads((project / paths.TRAIN_REPORT).read_text())["epochs"] == 16
    finally:
        set_param(project, "train.epochs", 15)


def _node(checkout, args: list[str], env: dict) -> subprocess.Popen:
    """`tollgate train` on one torchrun "node": a checkout of its own, one process."""
    set_param(checkout, "train.torchrun_args", args)
    return subprocess.Popen(
        ["tollgate", "train"],
        cwd=checkout,
        env={**tool_env(checkout), **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_torchrun_on_one_node_and_on_two_trains_the_same_model_logged_once(project):
    reference = project.parent / "reference"
    client = model_client(project)
    experiment = client.get_experiment_by_name("tollgate").experiment_id
    runs_before = len(client.search_runs([experiment]))
    set_param(project, "train.threads", 1)  # the same arithmetic in every process of both layouts
    set_param(project, "train.nproc_per_node", 2)
    out = run(["tollgate", "train"], cwd=project)
    assert "torch.distributed.run --nproc-per-node=2" in out.stdout + out.stderr
    report = json.loads((project / paths.TRAIN_REPORT).read_text())
    assert report["world_size"] == 2 and np.isfinite(report["val_loss"])
    single = _test_accuracy(reference / "models", project)
    ddp = _test_accuracy(project / paths.MODEL_DIR, project)
    assert single > 0.95 and abs(ddp - single) <= 0.02
    runs = client.search_runs([experiment])
    assert len(runs) == runs_before + 1  # rank 0 alone logs
    assert runs[0].data.tags["tollgate.world_size"] == "2"
    one_node = _weights(project / paths.MODEL_DIR)

    # Two nodes on this machine, one process each, meeting at a c10d rendezvous; the second node is a
    # checkout of its own sharing the registry, as on another machine.
    set_param(project, "train.nproc_per_node", 1)
    other = project.parent / "node-b"
    shutil.copytree(project, other, ignore=shutil.ignore_patterns("mlflow.db", "mlartifacts"))
    shared = {"MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}"}
    args = ["--nnodes=2", f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--rdzv-conf=join_timeout=60"]
    try:
        nodes = [_node(checkout, args, shared) for checkout in (project, other)]
        outputs = [node.communicate(timeout=300)[0] for node in nodes]
        assert [node.returncode for node in nodes] == [0, 0], outputs
        assert all("--rdzv-backend=c10d --rdzv-id=tollgate-" in out for out in outputs)
        runs = client.search_runs([experiment])
        assert len(runs) == runs_before + 2  # one run for both nodes
        assert runs[0].data.tags["tollgate.world_size"] == "2"
        for checkout in (project, other):  # every node ends with the outputs, the same weights as above
            node_report = json.loads((checkout / paths.TRAIN_REPORT).read_text())
            assert node_report["world_size"] == 2 and node_report["run_id"] == runs[0].info.run_id
            for name, tensor in _weights(checkout / paths.MODEL_DIR).items():
                assert torch.equal(tensor, one_node[name]), name

        lone = _node(other, [*args[:2], "--rdzv-conf=join_timeout=5"], shared)
        start = time.monotonic()
        out = lone.communicate(timeout=120)[0]
        assert lone.returncode == 1 and time.monotonic() - start < 60, out
        assert "not enough nodes joined the rendezvous at 127.0.0.1" in out and "on every node" in out
    finally:
        set_param(project, "train.torchrun_args", [])
        set_param(project, "train.threads", 0)
