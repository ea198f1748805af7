"""Load test: tollgate's server vs `mlflow models serve` vs TorchServe, on the same registered model, side
by side in one run.

Builds a fresh project copy, runs the pipeline once to register a champion, starts each server on
127.0.0.1 in turn and drives it with wrk (Debian package `wrk`) at 16 connections, the same request every
time: one test image as MLflow scoring JSON (`{"inputs": ...}`) to `POST /invocations` (tollgate, MLflow)
or `POST /predictions/<name>` (TorchServe, from `tollgate deploy --target torchserve`, token authorization
off for wrk, batching from params.yaml). Prints throughput and latency percentiles.
Target on 2 cores (issue 6): tollgate >= 5x MLflow's throughput and p99 <= 50 ms.

`--model resnet18 --side 32|224` serves a compute-bound model instead of the digits CNN: ResNet-18
(`train.backbone: resnet18` at 32x32, timm's `resnet18.tv_in1k` from scratch at 224x224) trained one epoch
on a synthetic RGB folder, with tollgate also serving its gated ONNX and int8 artefacts (issue 26). A
version is one training run, so each runtime is its own run of the pipeline (another seed each: the same
network, other weights; speed does not depend on them); MLflow serves the torch one, TorchServe each. The
gate's quality checks only warn there and the runtime gate asks only for speed: this bench measures
serving, not a model worth shipping.

    .venv/bin/python bench/serve_load.py [--seconds 20] [--connections 16] [--model resnet18 --side 32]
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
import typing
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.core.config import GateCheck  # noqa: E402
from tests.support import (  # noqa: E402
    MlflowServer,
    Server,
    TorchServe,
    make_project,
    run,
    set_param,
    write_image_folder,
)

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


def load_args(doc: str, seconds: int, models: bool = False):
    """--seconds and --connections (and with `models`, --model and --side); wrk must be installed."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=seconds)
    ap.add_argument("--connections", type=int, default=16)
    if models:
        ap.add_argument("--model", choices=["small_cnn", "resnet18"], default="small_cnn")
        ap.add_argument("--side", type=int, choices=[32, 224], default=32)
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


def resnet_project(project: Path, side: int) -> None:
    """The compute-bound case: ResNet-18 on `side`x`side` RGB, one epoch, quality checks warn-only."""
    write_image_folder(project / "data" / "raw", per_class=60)
    set_param(project, "data.source", "imagefolder")
    set_param(project, "data.image_size", [side, side])
    set_param(project, "data.channels", 3)
    set_param(project, "train.backbone", "resnet18" if side == 32 else "resnet18.tv_in1k")
    set_param(project, "train.epochs", 1)
    set_param(project, "gate.warn_only", list(typing.get_args(GateCheck)))
    set_param(project, "gate.min_agreement", 0.0)
    set_param(project, "gate.max_quantized_drop", 1.0)


def _runtime(url: str) -> str:
    """What the server says answers; it may shed requests (503) until wrk's backlog has drained."""
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{url}/v2/models/{NAME}", timeout=30) as r:
                return json.load(r)["parameters"]["runtime"]
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def _measure(label: str, start, path: str, script: Path, args, results: dict) -> None:
    server = start()
    try:
        wrk(server.url + path, script, 3, args.connections)  # warm-up
        results[label] = wrk(server.url + path, script, args.seconds, args.connections)
        if label.startswith("tollgate"):  # what answered: a runtime that failed its gate serves torch
            results[label]["socket_errors"] += f"; answered by {_runtime(server.url)}"
    finally:
        server.stop()


def main() -> None:
    args = load_args(__doc__, 20, models=True)
    resnet = args.model == "resnet18"
    with tempfile.TemporaryDirectory() as tmp:
        project = make_project(Path(tmp) / "project")
        if resnet:
            resnet_project(project, args.side)
        print("running the pipeline once to register a champion ...", flush=True)
        run(["dvc", "repro"], cwd=project)
        script, image = scoring_script(project, Path(tmp))
        side, channels = len(image[0]), len(image[0][0][0])
        results = {}
        label = "tollgate torch" if resnet else "tollgate"
        _measure(label, lambda: Server(project), "/invocations", script, args, results)
        _measure("mlflow", lambda: MlflowServer(project, NAME), "/invocations", script, args, results)
        torchserve = functools.partial(TorchServe, project, token_auth=False)  # wrk sends no key
        _measure("torchserve", torchserve, "", script, args, results)
        for seed, runtime in enumerate(("onnx", "onnx-int8") if resnet else (), start=2):
            set_param(project, "seed", seed)
            set_param(project, "serve.runtime", runtime)
            run(["dvc", "repro"], cwd=project)
            registration = json.loads((project / "reports" / "registration.json").read_text())
            for row in registration["runtimes"]:
                print(
                    f"{row['runtime']} gate row: agreement {row['agreement']:.3f}, batch-1 p50 "
                    f"{row['p50_ms']:.2f} ms vs eager {row['eager_p50_ms']:.2f} ms",
                    flush=True,
                )
            _measure(f"tollgate {runtime}", lambda: Server(project), "/invocations", script, args, results)
            _measure(f"torchserve {runtime}", torchserve, "", script, args, results)  # the archive carries it

    shape = f"{side}x{side}x{channels}"
    model = f"ResNet-18 at {args.side}x{args.side}" if resnet else "the digits CNN"
    print(
        f"\n{model}, {args.connections} connections, {args.seconds} s, one {shape} image per "
        "request, MLflow scoring JSON"
    )
    print(f"{'server':<20} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'non-2xx':>8}  socket errors")
    for server, r in results.items():
        print(
            f"{server:<20} {r['rps']:>9.1f} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} {r['non_2xx']:>8}  "
            f"{r['socket_errors']}"
        )
    ours = results[label]["rps"]
    print(f"throughput ratio tollgate/mlflow: {ours / results['mlflow']['rps']:.1f}x   (target >= 5x)")
    if resnet:
        best = max(results[k]["rps"] for k in results if k.startswith("tollgate"))
        print(
            f"best tollgate runtime / tollgate torch: {best / ours:.2f}x (target >= 2x), "
            f"/ torchserve: {best / results['torchserve']['rps']:.2f}x (target >= 1.5x)"
        )


if __name__ == "__main__":
    main()
