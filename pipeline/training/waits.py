"""How torch's CPU threads wait for each other, chosen before torch loads: OpenMP reads OMP_WAIT_POLICY
once, when its library loads, and keeps it for the process.

OpenMP's default lets an idle thread spin for a while before it sleeps. On free cores that is the fastest
way to start the next parallel region; when other processes want the same cores, the spinning threads
burn the time slices the working thread needs (docs/benchmarks.md, `bench/busy_threads.py`). Passive
waits cost 16-35 % on a quiet machine, so `auto` picks them only when the machine is busy as the stage
starts: when the 1-minute load average leaves fewer free cores than torch has threads.
"""

from __future__ import annotations

import os
import sys

ENV = "OMP_WAIT_POLICY"


def choose(policy: str, threads: int, cores: int, load: float) -> str | None:
    """OMP_WAIT_POLICY for `policy` (auto | spin | passive) when the stage runs `threads` torch threads in
    all on `cores` cores under `load` (the load average: processes wanting a core); None leaves OpenMP's
    default (spinning)."""
    if policy == "passive" or (policy == "auto" and cores - round(load) < threads):
        return "PASSIVE"
    return None


def apply(policy: str, threads_per_process: int, processes: int) -> str:
    """Set this process's OMP_WAIT_POLICY (torchrun's workers inherit it) and say what was chosen and
    why. A policy already in the environment is the user's and wins."""
    if ENV in os.environ:
        return f"torch threads wait as OMP_WAIT_POLICY={os.environ[ENV]} says (set in the environment)"
    if "torch" in sys.modules:  # OpenMP has read the environment already
        return "torch threads wait as OpenMP's default says (torch was loaded before the policy was set)"
    cores = os.cpu_count() or 1
    load = os.getloadavg()[0]
    wanted = threads_per_process * processes if threads_per_process else cores
    chosen = choose(policy, wanted, cores, load)
    why = f"train.wait_policy: {policy}; load {load:.1f} on {cores} cores, {wanted} torch threads"
    if chosen is None:
        return f"torch threads spin while they wait (OpenMP's default; {why})"
    os.environ[ENV] = chosen
    return f"torch threads wait passively ({why})"
