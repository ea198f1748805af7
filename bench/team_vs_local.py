"""The same cold pipeline (`dvc repro`, digits) on the local defaults (MLflow on SQLite in the project) and on
the team stack (MLflow server on PostgreSQL proxying artifacts to S3), each in a fresh copy of the repo,
back to back; then `tollgate stack up` cold (new data folder) and warm (again after `down`), and the
memory of each service. Target (issue 12): team <= 1.3 x local.

    .venv/bin/python bench/team_vs_local.py
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.core.config import load_params  # noqa: E402
from pipeline.serving.client import free_port  # noqa: E402
from pipeline.stack.services import Stack  # noqa: E402
from tests.support import make_project, set_param, tool_env  # noqa: E402


def timed(cmd: list[str], cwd: Path, **env: str) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, env={**tool_env(cwd), **env}, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        home = make_project(tmp / "stack")
        for key in ("postgres_port", "s3_port", "mlflow_port", "prefect_port"):
            set_param(home, f"stack.{key}", free_port())
        stack = Stack.of(load_params(home / "params.yaml").stack, home)
        # neither side should pay for reading the libraries from disk the first time
        timed([sys.executable, "-c", "import torch, mlflow, great_expectations, dvc.repo, prefect"], tmp)
        cold = timed(["tollgate", "stack", "up"], home)
        timed(["tollgate", "stack", "down"], home)
        warm = timed(["tollgate", "stack", "up"], home)
        try:
            local = timed(["dvc", "repro"], make_project(tmp / "local"))
            team = timed(["dvc", "repro"], make_project(tmp / "team"), **stack.client_env())
            memory = {name: row.get("rss_mb") for name, row in stack.status().items()}
        finally:
            timed(["tollgate", "stack", "down", "--purge"], home)
    print(f"tollgate stack up   cold {cold:5.1f} s   warm {warm:5.1f} s")
    print("memory (MB)         " + "   ".join(f"{k} {v}" for k, v in memory.items()))
    print(f"dvc repro, local    {local:5.1f} s   (MLflow on SQLite)")
    print(f"dvc repro, team     {team:5.1f} s   ({team / local:.2f} x local; target <= 1.3 x)")


if __name__ == "__main__":
    main()
