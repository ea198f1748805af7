"""Resident memory of one `tollgate serve` replica per runtime: a fresh project copy through `dvc repro`
with `serve.runtime: onnx` (so @champion carries its gated ONNX artefact), then the server started with
`serve.runtime` torch and onnx in turn, 200 requests each, and its RSS (psutil) read after them.

    .venv/bin/python bench/serve_rss.py
"""

from __future__ import annotations

import json
import sys
import tempfile
import urllib.request
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.core import paths  # noqa: E402
from pipeline.data.prepared import load_split  # noqa: E402
from tests.support import Server, make_project, run, set_param  # noqa: E402


def _rss_after_requests(project: Path, runtime: str, x: np.ndarray) -> tuple[float, str]:
    set_param(project, "serve.runtime", runtime)
    server = Server(project)
    try:
        body = json.dumps({"inputs": x.tolist()}).encode()
        for _ in range(200):
            req = urllib.request.Request(
                f"{server.url}/invocations", body, {"Content-Type": "application/json"}
            )
            urllib.request.urlopen(req, timeout=30).read()
        meta = json.loads(urllib.request.urlopen(f"{server.url}/v2/models/tollgate-classifier").read())
        proc = psutil.Process(server.proc.pid)
        rss = sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)])
        return rss / 2**20, meta["parameters"]["runtime"]
    finally:
        server.stop()


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        project = make_project(Path(tmp) / "project")
        set_param(project, "serve.runtime", "onnx")
        run(["dvc", "repro"], cwd=project)
        x = np.asarray(load_split(project / paths.PREPARED_DIR, "test").x[:4])
        print("| serve.runtime | answered by | RSS MB |")
        print("|---|---|---|")
        for runtime in ("torch", "onnx"):
            rss, answered = _rss_after_requests(project, runtime, x)
            print(f"| {runtime} | {answered} | {rss:.0f} |", flush=True)


if __name__ == "__main__":
    main()
