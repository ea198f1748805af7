"""The `tollgate` console script's exit: it skips the interpreter's teardown, and nothing else it owes."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points

# A command that owes its exit work: a non-daemon thread still writing, an atexit handler registered after
# the entry's own (as MLflow's are, on import), and output still in stdout's buffer; and an object that the
# interpreter's teardown would finalise.
OWING = """
import atexit, sys, threading, time
from pathlib import Path
import pipeline.cli as cli

out = Path(sys.argv[1])

class Torn:
    def __del__(self):
        (out / "teardown").write_text("ran")

kept = Torn()

def main():
    atexit.register(lambda: (out / "atexit").write_text("ran"))
    threading.Thread(target=lambda: (time.sleep(0.5), (out / "thread").write_text("ran"))).start()
    sys.stdout.write("unflushed")
    return int(sys.argv[2])

cli.main = main
cli.entry()
"""


def test_the_console_script_is_the_entry_that_exits_without_teardown():
    (script,) = (ep for ep in entry_points(group="console_scripts") if ep.name == "tollgate")
    assert script.value == "pipeline.cli:entry"


def test_the_exit_keeps_the_status_threads_atexit_handlers_and_buffered_output(tmp_path):
    for status in (0, 3):
        for name in ("atexit", "thread", "teardown"):
            (tmp_path / name).unlink(missing_ok=True)
        proc = subprocess.run(
            [sys.executable, "-c", OWING, str(tmp_path), str(status)], capture_output=True, text=True
        )
        assert proc.returncode == status, proc.stderr
        assert proc.stdout == "unflushed"
        assert (tmp_path / "thread").read_text() == "ran"
        assert (tmp_path / "atexit").read_text() == "ran"
        assert not (tmp_path / "teardown").exists()  # the teardown this exit is for was skipped


def test_an_uncaught_exception_exits_the_usual_way(tmp_path):
    code = OWING.replace("return int(sys.argv[2])", "raise RuntimeError('boom')")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path), "0"], capture_output=True, text=True)
    assert proc.returncode == 1 and "RuntimeError: boom" in proc.stderr
    assert (tmp_path / "atexit").read_text() == "ran" and (tmp_path / "teardown").read_text() == "ran"
