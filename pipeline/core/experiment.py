"""Whether this process runs inside a DVC experiment, and where the project itself is.

`dvc exp run` (in the workspace, `--temp` or queued) sets DVC_EXP_NAME and DVC_EXP_BASELINE_REV for the
stages it runs, and DVC_ROOT to the project's own repository even when the stages run in a temporary copy
of it. An experiment trains, evaluates and registers like any run, into the project's own tracking store,
but is never production: it moves no alias that serves and touches no serving target.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Experiment:
    name: str
    baseline: str  # the commit the experiment started from

    @property
    def alias(self) -> str:
        """The registry alias of its version: `exp-<name>`, in the characters MLflow allows in aliases."""
        return "exp-" + "".join(c if c.isalnum() or c in "-_" else "-" for c in self.name)


def current() -> Experiment | None:
    """The DVC experiment this process runs in, or None for a plain `dvc repro` or command."""
    name = os.environ.get("DVC_EXP_NAME")
    return Experiment(name, os.environ.get("DVC_EXP_BASELINE_REV", "")) if name else None


def project_root(root: Path) -> Path:
    """The project's own checkout: DVC_ROOT when DVC names one (a queued or --temp experiment runs its
    stages in a copy under .dvc/tmp, whose files vanish afterwards), else `root`."""
    named = os.environ.get("DVC_ROOT")
    return Path(named).resolve() if named and Path(named).is_dir() else root


def _flatten(tree, prefix: str = "") -> dict[str, object]:
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree}
    out: dict[str, object] = {}
    for key, value in tree.items():
        out.update(_flatten(value, f"{prefix}{key}."))
    return out


def params_diff(root: Path, baseline: str, params_file: str = "params.yaml") -> dict[str, list]:
    """What this run's params.yaml (in `root`, the folder the stages run in) changed against the baseline
    commit, read from the project's own repository: {dotted key: [was, now]}. Empty when the baseline's
    file cannot be read (not a git checkout)."""
    import yaml

    try:
        was = subprocess.run(
            ["git", "show", f"{baseline}:{params_file}"],
            cwd=project_root(root),
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return {}
    before = _flatten(yaml.safe_load(was) or {})
    after = _flatten(yaml.safe_load((root / params_file).read_text()) or {})
    keys = sorted(set(before) | set(after))
    return {k: [before.get(k), after.get(k)] for k in keys if before.get(k) != after.get(k)}
