"""Named points where a test can make this process die or freeze, to prove what a crash there leaves.

With TOLLGATE_FAILPOINT=<name> in its environment, a process that reaches `reach(name)` kills itself with
SIGKILL: no cleanup runs, exactly as after `kill -9` or a power cut. With TOLLGATE_FAILPOINT=<name>:stop it
stops itself (SIGSTOP) instead, for the test to break something around it (a server, a disk) and let it go
on with SIGCONT. Unset (always, outside tests), a point costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal


def reach(name: str) -> None:
    wanted = os.environ.get("TOLLGATE_FAILPOINT")
    if wanted == name:
        os.kill(os.getpid(), signal.SIGKILL)
    elif wanted == f"{name}:stop":
        os.kill(os.getpid(), signal.SIGSTOP)
