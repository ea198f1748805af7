"""The real MNIST train stage (`profiles/mnist-cpu.yaml`, `tollgate train` in its own process) on a quiet
machine and beside two CPU-bound busy loops, under `train.wait_policy` auto (the default), spin and
passive and at 1 and 2 threads: wall time and which waits auto chose (the stage's own log line). The busy
arms start once the 1-minute load average, which auto reads, shows the loops.

    .venv/bin/python bench/busy_train.py
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.core.config import load_profile  # noqa: E402
from tests.support import MNIST_FILES, ROOT, profile_project, run, set_param, tool_env  # noqa: E402

ARMS = {  # label: (train.wait_policy, train.threads)
    "auto, 2 threads": ("auto", 0),
    "spin, 2 threads": ("spin", 0),
    "passive, 2 threads": ("passive", 0),
    "spin, 1 thread": ("spin", 1),
}
CHOSE = re.compile(r"\[tollgate\] (torch threads [^(]+)")


def _train(project: Path, policy: str, threads: int) -> tuple[float, str]:
    set_param(project, "train.wait_policy", policy)
    set_param(project, "train.threads", threads)
    env = {k: v for k, v in tool_env(project).items() if k != "OMP_WAIT_POLICY"}
    start = time.perf_counter()
    proc = subprocess.run(["tollgate", "train"], cwd=project, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(proc.stdout + proc.stderr)
    return wall, CHOSE.search(proc.stdout).group(1).strip()


def _rows(project: Path, machine: str, arms: list[str]) -> None:
    for label in arms:
        wall, chose = _train(project, *ARMS[label])
        print(f"| {machine} | {label} | {wall:.1f} | {chose} |", flush=True)


def main() -> None:
    overrides = load_profile(ROOT / "profiles" / "mnist-cpu.yaml", ROOT / "params.yaml")
    with tempfile.TemporaryDirectory() as tmp:
        project = profile_project(Path(tmp) / "project", overrides, MNIST_FILES)
        run(["tollgate", "prepare"], cwd=project)
        run(["tollgate", "validate"], cwd=project)
        print("| machine | train.wait_policy, threads | train stage s | waits |")
        print("|---|---|---|---|")
        _rows(project, "quiet", ["auto, 2 threads", "passive, 2 threads"])
        busy = [subprocess.Popen([sys.executable, "-c", "while 1: pass"]) for _ in range(2)]
        try:
            while os.getloadavg()[0] < 1.5:  # a 1-minute mean: about 30 s after the loops start
                time.sleep(1)
            _rows(project, "2 busy loops", list(ARMS))
        finally:
            for proc in busy:
                proc.kill()
                proc.wait()


if __name__ == "__main__":
    main()
