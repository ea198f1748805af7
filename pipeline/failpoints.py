"""Named points where a test can make this process die, to prove what a crash there leaves behind.

With TOLLGATE_FAILPOINT=<name> in its environment, a process that reaches `reach(name)` kills itself with
SIGKILL: no cleanup runs, exactly as after `kill -9` or a power cut. Unset (always, outside tests), a
point costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal


def reach(name: str) -> None:
    if os.environ.get("TOLLGATE_FAILPOINT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
