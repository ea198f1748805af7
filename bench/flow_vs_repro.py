"""Wall time of the same cold run two ways: `dvc repro` and the Prefect flow (`tollgate flow`) against a
running Prefect server, each in its own fresh copy of the repo (no lock file, outputs, DVC cache or MLflow
store). Target (issue 7): flow <= 1.2 x dvc repro.

    .venv/bin/python bench/flow_vs_repro.py
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.serving.client import free_port  # noqa: E402
from tests.support import make_project, tool_env  # noqa: E402


def timed(cmd: list[str], cwd: Path, env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def prefect_server(home: Path) -> tuple[subprocess.Popen, str]:
    """`prefect server start` on a free port with its own database, as a team would leave it running."""
    port = free_port()
    env = {**tool_env(), "PREFECT_HOME": str(home)}
    proc = subprocess.Popen(
        ["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2).close()
            return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("prefect server did not start")


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        server, url = prefect_server(tmp / "prefect-home")
        try:
            env = {**tool_env(), "PREFECT_API_URL": url}
            flow_project = make_project(tmp / "flow")
            # Neither side should pay for reading the libraries from disk the first time.
            timed([sys.executable, "-c", "import torch, mlflow, great_expectations, dvc.repo"], tmp, env)
            repro = timed(["dvc", "repro"], make_project(tmp / "repro"), env)
            flow = timed(["tollgate", "flow"], flow_project, env)
        finally:
            server.terminate()
            server.wait(timeout=60)
    print(f"dvc repro       {repro:6.1f} s")
    print(f"tollgate flow   {flow:6.1f} s   ({flow / repro:.2f} x dvc repro; target <= 1.2 x)")


if __name__ == "__main__":
    main()
