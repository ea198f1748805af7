"""Named points where a test can make this process die or freeze, to prove what a crash there leaves.

With TOLLGATE_FAILPOINT=<name> in its environment, a process that reaches `reach(name)` kills itself with
SIGKILL: no cleanup runs, exactly as after `kill -9` or a power cut. With TOLLGATE_FAILPOINT=<name>:stop it
stops itself (SIGSTOP) instead, for the test to break something around it (a server, a disk) and let it go
on with SIGCONT. With <name>:pause it writes `paused-<pid>` into the folder TOLLGATE_FAILPOINT_DIR and
waits, threads still running, until a file `go` appears there: a test can line several processes up at
one point, or kill one while it holds something. With <name>:raise the point raises FailpointError, as an
error at that point would, and with <name>:raise=<fraction> it raises on that share of reaches (every
round(1/fraction)-th, as a flaky dependency would); with <name>:sleep=<seconds> it sleeps that long, as
a slow dependency would. With <name>:on, `armed(name)` is true: the code there corrupts its own result (an
int8 model that disagrees with its eager twin), for a test to prove that a gate catches it.
Unset (always, outside tests), a point costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path


class FailpointError(RuntimeError):
    pass


_reached: dict[str, int] = {}


def reach(name: str) -> None:
    wanted = os.environ.get("TOLLGATE_FAILPOINT")
    if wanted is None or not wanted.startswith(name):
        return
    if wanted == name:
        os.kill(os.getpid(), signal.SIGKILL)
    elif wanted == f"{name}:stop":
        os.kill(os.getpid(), signal.SIGSTOP)
    elif wanted == f"{name}:raise":
        raise FailpointError(f"failpoint {name}")
    elif wanted.startswith(f"{name}:raise="):
        _reached[name] = count = _reached.get(name, 0) + 1
        if count % max(1, round(1 / float(wanted.partition("=")[2]))) == 0:
            raise FailpointError(f"failpoint {name} (reach {count})")
    elif wanted.startswith(f"{name}:sleep="):
        time.sleep(float(wanted.partition("=")[2]))
    elif wanted == f"{name}:pause":
        folder = Path(os.environ["TOLLGATE_FAILPOINT_DIR"])
        (folder / f"paused-{os.getpid()}").touch()
        while not (folder / "go").exists():
            time.sleep(0.05)


def armed(name: str) -> bool:
    return os.environ.get("TOLLGATE_FAILPOINT") == f"{name}:on"
