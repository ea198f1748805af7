"""Promotion latency with replicas that follow @champion (issue 13): the time from the alias move to every
replica serving the new version, for 1 and 3 `tollgate serve` replicas (`serve.follow_interval_s`, 1 s
here), and the whole `tollgate rollback` as a user waits for it; then what the promotion guard costs per
promotion: taking and releasing it, for the checkout lock alone (local registry), a Prefect global
concurrency limit and a PostgreSQL advisory lock (both on a `tollgate stack` started for the purpose).

    .venv/bin/python bench/promotion_latency.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.core.config import load_params  # noqa: E402
from pipeline.release import guard  # noqa: E402
from pipeline.serving.client import free_port  # noqa: E402
from pipeline.stack.services import Stack  # noqa: E402
from tests.support import Server, make_project, model_client, set_param, tool_env  # noqa: E402

NAME = "tollgate-classifier"


def _served(url: str) -> str:
    with urllib.request.urlopen(f"{url}/v2/models/{NAME}", timeout=5) as resp:
        return str(json.loads(resp.read())["versions"][0])


def _first_time(condition, stop: threading.Event, out: list[float]) -> None:
    while not stop.is_set():
        if condition():
            out.append(time.perf_counter())
            return
        time.sleep(0.01)


def one_move(project: Path, urls: list[str], to: str) -> tuple[float, float]:
    """(alias move → all replicas serve `to`, whole command) in seconds."""
    client = model_client(project)
    moved: list[float] = []
    served: list[float] = []
    stop = threading.Event()
    watchers = [
        threading.Thread(
            target=_first_time,
            args=(
                lambda: str(client.get_model_version_by_alias(NAME, "champion").version) == to,
                stop,
                moved,
            ),
        ),
        threading.Thread(
            target=_first_time, args=(lambda: all(_served(u) == to for u in urls), stop, served)
        ),
    ]
    for w in watchers:
        w.start()
    start = time.perf_counter()
    env = {**tool_env(project), "TOLLGATE_REPLICAS": ",".join(urls)}
    subprocess.run(
        ["tollgate", "rollback", "--to", to], cwd=project, env=env, check=True, capture_output=True
    )
    whole = time.perf_counter() - start
    time.sleep(0.1)
    stop.set()
    for w in watchers:
        w.join()
    return served[0] - moved[0], whole


def replicas_latency(tmp: Path, rounds: int) -> None:
    project = make_project(tmp / "project")
    set_param(project, "serve.follow_interval_s", 1.0)
    env = tool_env(project)
    subprocess.run(["dvc", "repro"], cwd=project, env=env, check=True, capture_output=True)
    set_param(project, "train.epochs", 14)
    subprocess.run(["dvc", "repro"], cwd=project, env=env, check=True, capture_output=True)
    registry = {"MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}"}
    for n in (1, 3):
        servers = []
        for i in range(n):
            folder = tmp / f"replica-{n}-{i}"
            folder.mkdir()
            (folder / "params.yaml").write_bytes((project / "params.yaml").read_bytes())
            servers.append(Server(folder, registry))
        try:
            lags, wholes = [], []
            for r in range(rounds):
                lag, whole = one_move(project, [s.url for s in servers], "1" if r % 2 == 0 else "2")
                lags.append(lag)
                wholes.append(whole)
        finally:
            for s in servers:
                s.stop()
        print(
            f"{n} replica(s), follow interval 1 s: alias move -> all serving median "
            f"{statistics.median(lags):.2f} s (max {max(lags):.2f}); "
            f"tollgate rollback median {statistics.median(wholes):.2f} s"
        )


def guard_overhead(tmp: Path, rounds: int) -> None:
    home = make_project(tmp / "stack")
    for key in ("postgres_port", "s3_port", "mlflow_port", "prefect_port"):
        set_param(home, f"stack.{key}", free_port())
    params = load_params(home / "params.yaml")
    stack = Stack.of(params.stack, home)
    subprocess.run(["tollgate", "stack", "up"], cwd=home, env=tool_env(home), check=True, capture_output=True)
    try:
        cases = {
            "checkout lock alone (local registry)": ("sqlite:///x.db", {}),
            "Prefect global concurrency limit": (stack.mlflow_url, {"PREFECT_API_URL": stack.prefect_url}),
            "PostgreSQL advisory lock": (stack.topology.database("mlflow", "psycopg2"), {}),
        }
        for what, (uri, env) in cases.items():
            os.environ.pop("PREFECT_API_URL", None)
            os.environ.update(env)
            times = []
            for _ in range(rounds + 1):  # the first one pays for imports and creating the limit
                start = time.perf_counter()
                with guard.held(params, uri):
                    pass
                times.append(time.perf_counter() - start)
            print(
                f"guard: {what:40s} first {times[0] * 1000:7.1f} ms, "
                f"then median {statistics.median(times[1:]) * 1000:6.1f} ms"
            )
    finally:
        subprocess.run(
            ["tollgate", "stack", "down", "--purge"], cwd=home, env=tool_env(home), capture_output=True
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        replicas_latency(Path(tmp), args.rounds)
        guard_overhead(Path(tmp), args.rounds)


if __name__ == "__main__":
    main()
