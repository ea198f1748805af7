"""Routing overhead of a loaded canary: `tollgate serve` with no canary vs with @canary loaded at weight 0
(every request still answered by the champion, but routed and recorded for the analysis), and at 5 %,
driven by wrk back to back in one run, alternating, on the same request (one test image, MLflow scoring
JSON). Target (issue 25): weight 0 within 5 % of no canary's throughput.

    .venv/bin/python bench/canary_routing.py [--seconds 15] [--connections 16]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.serve_load import load_args, scoring_script, wrk  # noqa: E402
from tests.support import Server, http, make_project, model_client, run, set_param  # noqa: E402

NAME = "tollgate-classifier"
WEIGHT = "tollgate.canary.weight"


def _canary(project: Path, url: str, version: str | None, weight: float) -> None:
    """Point @canary (or remove it) at `weight` and wait until the server routes so."""
    client = model_client(project)
    if version is None:
        client.delete_registered_model_alias(NAME, "canary")
        client.delete_registered_model_tag(NAME, WEIGHT)
    else:
        client.set_registered_model_tag(NAME, WEIGHT, f"{weight:g}")
        client.set_registered_model_alias(NAME, "canary", version)
    expected = None if version is None else {"version": version, "weight": weight}
    deadline = time.monotonic() + 120
    while http("GET", f"{url}/v2/models/{NAME}")[1]["parameters"]["canary"] != expected:
        if time.monotonic() > deadline:
            raise SystemExit(f"the server did not take canary {expected}")
        time.sleep(0.2)


def main() -> None:
    args = load_args(__doc__, 15)
    with tempfile.TemporaryDirectory() as tmp:
        project = make_project(Path(tmp) / "project")
        print("running the pipeline once to register a champion ...", flush=True)
        run(["dvc", "repro"], cwd=project)
        set_param(project, "serve.follow_interval_s", 0.5)
        client = model_client(project)
        champion = client.get_model_version_by_alias(NAME, "champion")
        twin = client.copy_model_version(f"models:/{NAME}/{champion.version}", NAME).version  # same weights
        script, _ = scoring_script(project, Path(tmp))
        server = Server(project)
        results: dict[str, list[float]] = {"no canary": [], "canary at 0 %": [], "canary at 5 %": []}
        try:
            wrk(server.url + "/invocations", script, 3, args.connections)  # warm-up
            for _ in range(2):  # alternate, so drift of the machine's load hits every arm alike
                for label, version, weight in (
                    ("no canary", None, 0.0),
                    ("canary at 0 %", str(twin), 0.0),
                    ("canary at 5 %", str(twin), 5.0),
                ):
                    _canary(project, server.url, version, weight)
                    r = wrk(server.url + "/invocations", script, args.seconds, args.connections)
                    results[label].append(r["rps"])
                    print(f"{label:<14} {r['rps']:>9.1f} req/s  p99 {r['p99_ms']:.2f} ms", flush=True)
        finally:
            server.stop()
    best = {label: max(v) for label, v in results.items()}
    base = best["no canary"]
    print(f"\n{args.connections} connections, {args.seconds} s per arm, best of 2 alternating runs")
    for label, rps in best.items():
        print(f"{label:<14} {rps:>9.1f} req/s  {rps / base:.3f}x of no canary")
    print("target: canary at 0 % >= 0.95x of no canary")


if __name__ == "__main__":
    main()
