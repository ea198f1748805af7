"""Training on a busy machine: a small CNN's training steps per second at 1 and 2 torch threads, with
OpenMP's default (spinning) waits and with OMP_WAIT_POLICY=PASSIVE (what `train.wait_policy: auto` picks
on a busy machine: docs/training.md), on a quiet machine, beside two CPU-bound busy loops, and beside
another training with the same settings (two trainings on one machine, each running the arm; the figure
is their sum). Each arm is a fresh process (OpenMP reads the policy when torch loads), 8 s of steps
after a warm-up.

    .venv/bin/python bench/busy_threads.py
"""

from __future__ import annotations

import os
import subprocess
import sys

ARM = r"""
import sys, time, torch
from torch import nn
torch.set_num_threads(int(sys.argv[1]))
net = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
                    nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))
opt = torch.optim.SGD(net.parameters(), 0.01)
x, y = torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,))
def step():
    opt.zero_grad()
    nn.functional.cross_entropy(net(x), y).backward()
    opt.step()
for _ in range(3):
    step()
start, n = time.perf_counter(), 0
while time.perf_counter() - start < 8:
    step()
    n += 1
print(n / (time.perf_counter() - start))
"""


def _arm(threads: int, policy: str | None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    return subprocess.Popen(
        [sys.executable, "-c", ARM, str(threads)], env=env, stdout=subprocess.PIPE, text=True
    )


def _steps_per_s(threads: int, policy: str | None, side_by_side: int) -> float:
    arms = [_arm(threads, policy) for _ in range(side_by_side)]
    return sum(float(arm.communicate()[0].strip()) for arm in arms)


def _table(label: str, side_by_side: int = 1) -> None:
    for threads in (1, 2):
        for policy in (None, "PASSIVE"):
            rate = _steps_per_s(threads, policy, side_by_side)
            print(f"| {label} | {threads} | {policy or 'default (spin)'} | {rate:.1f} |", flush=True)


def main() -> None:
    print("| machine | torch threads | OMP_WAIT_POLICY | steps/s |")
    print("|---|---|---|---|")
    _table("quiet")
    busy = [subprocess.Popen([sys.executable, "-c", "while 1: pass"]) for _ in range(2)]
    try:
        _table("2 busy loops")
    finally:
        for proc in busy:
            proc.kill()
            proc.wait()
    _table("2 trainings (sum)", side_by_side=2)


if __name__ == "__main__":
    main()
