"""Promotion and rollback where they can go wrong, with real processes on one project (two registered
versions): a server that does not answer, a version that cannot load, a promotion killed half-way, a server
starting in the middle of a promotion, and a rollback that the pipeline must not quietly undo. Each test
starts from @champion = v2 served by a fresh `tollgate serve`."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path
from urllib.parse import urlparse

import pytest

from pipeline.core import paths
from tests.support import (
    Server,
    http,
    model_client,
    run,
    set_param,
    stop_process,
    tool_env,
    wait_http,
)

pytestmark = pytest.mark.slow
NAME = "tollgate-classifier"


@pytest.fixture(scope="module")
def project(two_versions):
    return two_versions


def _alias(project, alias) -> str:
    return str(model_client(project).get_model_version_by_alias(NAME, alias).version)


def _served(server) -> str:
    return http("GET", f"{server.url}/v2/models/{NAME}")[1]["versions"][0]


@pytest.fixture
def server(project):
    """v2 is champion (v1 previous), no promotion pending, and a server follows it."""
    (project / paths.PROMOTION_INTENT).unlink(missing_ok=True)
    if _alias(project, "champion") != "2":
        run(["tollgate", "rollback", "--to", "2"], cwd=project)
    model_client(project).set_registered_model_alias(NAME, "previous", "1")
    srv = Server(project)
    yield srv
    if srv.proc.poll() is None:
        os.kill(srv.proc.pid, signal.SIGCONT)
        srv.stop()


def test_a_server_that_does_not_answer_fails_the_promotion_and_nothing_moves(project, server):
    """A busy or stuck server is not an absent one: promotion must not move the alias past it."""
    set_param(project, "promote.timeout_s", 2.0)
    os.kill(server.proc.pid, signal.SIGSTOP)  # alive, listening, answering nothing
    try:
        proc = run(["tollgate", "rollback", "--to", "1"], cwd=project, check=False)
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
        set_param(project, "promote.timeout_s", 30.0)
    assert proc.returncode == 1
    assert f"tollgate serve (pid {server.proc.pid}) at {server.url} did not answer within 2 s" in proc.stderr
    assert "nothing moved" in proc.stderr
    assert _alias(project, "champion") == "2" and _served(server) == "2"


def test_a_killed_servers_leftover_state_is_not_taken_for_a_server(project, server):
    server.proc.kill()  # SIGKILL: no cleanup runs, the state file stays behind
    server.proc.wait()
    assert (project / paths.SERVER_STATE).exists()
    out = run(["tollgate", "rollback", "--to", "1"], cwd=project).stdout
    assert "@champion → tollgate-classifier v1 (was v2); no server running" in out
    assert not (project / paths.SERVER_STATE).exists()


def _version_files(project, version: str) -> tuple[Path, Path]:
    """The folder holding a version's files in the local artifact store, and its weights file."""
    folder = Path(urlparse(model_client(project).get_model_version_download_uri(NAME, version)).path)
    return folder, next(folder.rglob("model.pt"))


@pytest.mark.parametrize("damage", ["truncated weights", "artifacts missing"])
def test_a_version_that_cannot_load_never_becomes_champion(project, server, damage):
    folder, weights = _version_files(project, "1")
    aside = folder.with_name(folder.name + ".aside")
    shutil.copytree(folder, aside)
    try:
        if damage == "truncated weights":
            weights.write_bytes(weights.read_bytes()[:200])
        else:
            shutil.rmtree(folder)
        proc = run(["tollgate", "rollback", "--to", "1"], cwd=project, check=False)
        assert proc.returncode == 1
        assert "v1 cannot be loaded from the registry" in proc.stderr and "nothing moved" in proc.stderr
        assert _alias(project, "champion") == "2" and _alias(project, "previous") == "1"
        assert _served(server) == "2"
        fresh = Server(project)  # the champion still loads: a new server starts and serves it
        try:
            assert _served(fresh) == "2"
        finally:
            fresh.stop()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        shutil.move(aside, folder)


def test_a_promotion_killed_after_the_alias_move_is_undone_by_the_next_server_start(project, server):
    proc = run(
        ["tollgate", "rollback", "--to", "1"],
        cwd=project,
        check=False,
        TOLLGATE_FAILPOINT="promote:alias-moved",
    )
    assert proc.returncode == -signal.SIGKILL
    # what kill -9 at that point leaves: the alias moved, the server not told, the intent on disk
    assert _alias(project, "champion") == "1" and _served(server) == "2"
    assert (project / paths.PROMOTION_INTENT).exists()
    second = Server(project)  # a server starting now first settles the interrupted promotion
    try:
        assert _alias(project, "champion") == "2" and _alias(project, "previous") == "1"
        assert _served(second) == "2" and _served(server) == "2"
        assert not (project / paths.PROMOTION_INTENT).exists()
    finally:
        second.stop()


def test_a_promotion_killed_after_verification_is_completed_by_the_next_one(project, server):
    proc = run(
        ["tollgate", "rollback", "--to", "1"], cwd=project, check=False, TOLLGATE_FAILPOINT="promote:verified"
    )
    assert proc.returncode == -signal.SIGKILL
    assert _alias(project, "champion") == "1" and _served(server) == "1"  # verified, then killed
    assert _alias(project, "previous") == "1"  # not yet pointed at the old champion
    out = run(["tollgate", "rollback", "--to", "1"], cwd=project).stdout
    assert "completed the interrupted promotion of v1" in out
    assert _alias(project, "champion") == "1" and _alias(project, "previous") == "2"
    assert not (project / paths.PROMOTION_INTENT).exists()


def test_a_server_starting_during_a_promotion_serves_what_the_promotion_leaves(project):
    """The server reads @champion under the promotion lock, so no promotion can fall between what it loads
    and the moment promotion can find it."""
    from filelock import FileLock

    from tests.support import free_port

    port = free_port()
    held = FileLock(str(project / paths.PROMOTE_LOCK))
    held.acquire()  # a promotion in progress
    proc = subprocess.Popen(
        ["tollgate", "serve", "--port", str(port)],
        cwd=project,
        env=tool_env(project),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        for line in proc.stdout:  # the server has started and waits for the lock
            if "waiting for the promotion in progress" in line:
                break
        assert not (project / paths.SERVER_STATE).exists()
        model_client(project).set_registered_model_alias(NAME, "champion", "1")  # the promotion's move
        held.release()
        wait_http(f"http://127.0.0.1:{port}/v2/health/ready", proc)
        assert http("GET", f"http://127.0.0.1:{port}/v2/models/{NAME}")[1]["versions"] == ["1"]
    finally:
        if held.is_locked:
            held.release()
        stop_process(proc)


def test_a_rolled_back_version_is_not_promoted_again_by_the_pipeline(project, server):
    run(["dvc", "repro"], cwd=project)  # up to date: the last registration is v2
    run(["tollgate", "rollback", "--to", "1"], cwd=project)
    set_param(project, "serve.max_latency_ms", 5.0)  # tuning the server is no reason to promote
    try:
        status = run(["dvc", "status"], cwd=project).stdout
        assert "promote:" not in status
        out = run(["dvc", "repro"], cwd=project).stdout
        assert "Running stage 'promote'" not in out
        assert _alias(project, "champion") == "1" and _served(server) == "1"
        out = run(["dvc", "repro", "--force", "--single-item", "promote"], cwd=project).stdout
        reason = (project / paths.PROMOTION).read_text()
        assert "v2 was rolled back" in reason and "tollgate rollback --to 2" in reason, out
        assert _alias(project, "champion") == "1" and _served(server) == "1"
        # on purpose it still works, and the version is no longer marked
        run(["tollgate", "rollback", "--to", "2"], cwd=project)
        assert "tollgate.rolled_back" not in model_client(project).get_model_version(NAME, "2").tags
        assert _served(server) == "2"
    finally:
        set_param(project, "serve.max_latency_ms", 2.0)
