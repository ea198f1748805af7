"""Shared fixtures. Tests run real components: DVC in a temp copy of the repo, MLflow on a temp SQLite
store, a real Prefect server, a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# Stage commands (`tollgate <stage>`) run as subprocesses of DVC: they must find this environment's entry
# points, and nothing may phone home or write into the developer's own MLflow store.
os.environ["PATH"] = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
os.environ.update(DO_NOT_TRACK="1", PREFECT_SERVER_ANALYTICS_ENABLED="false", GX_ANALYTICS_ENABLED="false")
os.environ.pop("MLFLOW_TRACKING_URI", None)


def repo_files() -> list[str]:
    """What a fresh clone holds: tracked files plus new ones git would add (untracked, not ignored)."""
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return sorted({f for f in out.split("\0") if f and (ROOT / f).is_file()})


def make_project(dst: Path) -> Path:
    """A copy of the repo as a fresh clone would have it, committed in its own git repo."""
    for rel in repo_files():
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, target)
    git = ["git", "-c", "user.email=test@tollgate", "-c", "user.name=test"]
    subprocess.run([*git, "init", "-q"], cwd=dst, check=True)
    subprocess.run([*git, "add", "-A"], cwd=dst, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "fresh clone"], cwd=dst, check=True)
    return dst


def run(cmd: list[str], cwd: Path, check: bool = True, **env: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env={**os.environ, **env})
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def set_param(project: Path, dotted: str, value: object) -> None:
    """Edit params.yaml the way a user would, keeping the rest of the file."""
    import yaml

    path = project / "params.yaml"
    params = yaml.safe_load(path.read_text())
    *parents, leaf = dotted.split(".")
    node = params
    for key in parents:
        node = node[key]
    node[leaf] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture(scope="session")
def prepared_digits(tmp_path_factory) -> Path:
    """The default dataset prepared once, for tests of the steps that read it."""
    from pipeline.config import load_params
    from pipeline.data import prepare

    params = load_params(ROOT / "params.yaml")
    out = tmp_path_factory.mktemp("prepared") / "prepared"
    prepare(params.data, params.seed, out)
    return out


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch) -> str:
    """A private SQLite tracking store for the test."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    return uri
