"""What watching live traffic costs, and how fast it notices: tollgate's server under wrk with live sampling
at 0 %, 10 % and 100 % and with a shadow challenger, side by side in one run; then drift detection delay
in requests for two distortions of the digits.

Builds a fresh project copy and runs the pipeline twice (v2 @champion, v1 set @challenger for the shadow
rows), then per row sets `monitor.sample_fraction` / `serve.shadow` in its params.yaml, starts
`tollgate serve` on 127.0.0.1 and drives `POST /invocations` with wrk as bench/serve_load.py does.
Targets (issue 14): <= 10 % throughput lost at 10 % sampling, p99 <= 50 ms.

    .venv/bin/python bench/monitor_load.py [--seconds 15] [--connections 16]
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import NAME, load_args, scoring_script, wrk  # noqa: E402

from tests.support import Server, http, make_project, model_client, run, set_param  # noqa: E402

ROWS = (("sampling 0 %", 0.0, False), ("sampling 10 %", 0.1, False), ("sampling 100 %", 1.0, False),
        ("10 % + shadow", 0.1, True))  # fmt: skip


def load_rows(project: Path, script: Path, seconds: int, connections: int) -> dict:
    results = {}
    for label, fraction, shadow in ROWS:
        set_param(project, "monitor.sample_fraction", fraction)
        set_param(project, "serve.shadow", shadow)
        server = Server(project)
        try:
            wrk(server.url + "/invocations", script, 3, connections)  # warm-up
            results[label] = wrk(server.url + "/invocations", script, seconds, connections)
            metrics = urllib_text(server.url + "/metrics")
            results[label]["dropped"] = _sum(metrics, "tollgate_live_samples_dropped_total")
            results[label]["shadowed"] = _sum(metrics, "tollgate_shadow_images_total")
        finally:
            server.stop()
    return results


def urllib_text(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.read().decode()


def _sum(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def detection_delays(project: Path, n: int = 1000) -> dict:
    """Requests between the start of a distortion and the first flagged window (every 10 samples)."""
    from pipeline.core.config import load_params
    from pipeline.data import shards
    from pipeline.monitoring import drift
    from pipeline.monitoring import report as monitor
    from pipeline.registry import store as tracking

    set_param(project, "monitor.sample_fraction", 1.0)
    set_param(project, "serve.shadow", False)
    set_param(project, "monitor.flush_s", 0.2)
    params = load_params(project / "params.yaml")
    store = tracking.connect(params, project)
    test_x = np.load(project / "data/prepared/test_x.npy")
    distortions = {"inverted": lambda x: 255 - x, "rotated 90°": lambda x: np.rot90(x, axes=(0, 1))}
    out = {}
    for label, distort in distortions.items():
        shutil.rmtree(project / "data/live", ignore_errors=True)
        server = Server(project)
        try:
            for i in range(2 * n):
                x = test_x[i % len(test_x)]
                body = json.dumps({"inputs": [(x if i < n else distort(x)).tolist()]}).encode()
                http("POST", server.url + "/invocations", body, {"Content-Type": "application/json"})
            time.sleep(1.0)
        finally:
            server.stop()
        rows = shards.read_latest(shards.LocalFolder(project / "data/live"), shards.SAMPLES)
        version = str(rows["version"][-1])
        window = monitor.window_of(rows)
        reference = monitor.reference_of(store, NAME, version)
        clean = drift.compare(reference, window.part(n - params.monitor.window, n), params.monitor)
        out[label] = {
            "delay": drift.first_alarm(reference, window, params.monitor, start=n, step=10),
            "clean_flagged": clean["drift"],
            "effects": {
                k: c["effect"]
                for k, c in drift.compare(reference, window.tail(params.monitor.window), params.monitor)[
                    "checks"
                ].items()
            },
        }
    return out


def main() -> None:
    args = load_args(__doc__, 15)
    with tempfile.TemporaryDirectory() as tmp:
        project = make_project(Path(tmp) / "project")
        print("running the pipeline twice (v1 becomes the shadow challenger) ...", flush=True)
        run(["dvc", "repro"], cwd=project)
        set_param(project, "train.epochs", 13)
        run(["dvc", "repro"], cwd=project)
        model_client(project).set_registered_model_alias(NAME, "challenger", "1")
        script, _ = scoring_script(project, Path(tmp))
        results = load_rows(project, script, args.seconds, args.connections)
        delays = detection_delays(project)

    base = results["sampling 0 %"]["rps"]
    print(f"\n{args.connections} connections, {args.seconds} s, one 8x8 digit per request, POST /invocations")
    head = ("server", "req/s", "vs 0 %", "p50 ms", "p99 ms", "dropped", "shadowed")
    print("{:<15} {:>9} {:>7} {:>8} {:>8} {:>8} {:>9}".format(*head))
    for label, r in results.items():
        change = r["rps"] / base - 1
        print(
            f"{label:<15} {r['rps']:>9.1f} {change:>+7.1%} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} "
            f"{r['dropped']:>8.0f} {r['shadowed']:>9.0f}"
        )
    print("targets: <= 10 % throughput lost at 10 % sampling; p99 <= 50 ms")
    print("\ndrift detection (window 500, judged every 10 requests, after 1,000 clean requests):")
    for label, d in delays.items():
        print(
            f"  {label:<12} flagged after {d['delay']} requests; clean window flagged: {d['clean_flagged']}; "
            f"effects at the end {d['effects']}"
        )


if __name__ == "__main__":
    main()
