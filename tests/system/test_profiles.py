"""Every shipped profile passes the gate end to end, as a user applies it: its overrides in params.yaml, the
real data of its source, `tollgate prepare` → `validate` → `train` → `evaluate`. The gate is the default
one unless the profile states its own (a `gate.*` key). A profile whose data is not on this machine is
skipped, naming what it needs."""

from __future__ import annotations

import json

import pytest

from pipeline.core import paths
from pipeline.core.config import load_profile
from tests.support import MNIST_FILES, ROOT, profile_project, run

pytestmark = pytest.mark.slow
FILES = {"mnist": MNIST_FILES}  # where this machine keeps each source's original files


@pytest.mark.parametrize("profile", sorted((ROOT / "profiles").glob("*.yaml")), ids=lambda p: p.stem)
def test_a_shipped_profile_passes_the_gate(profile, tmp_path):
    overrides = load_profile(profile, ROOT / "params.yaml")
    source = overrides["data.source"]
    files = FILES.get(source)
    if files is None or not files.is_dir():
        pytest.skip(f"{profile.name} needs the {source} files, which this machine does not have")
    project = profile_project(tmp_path / "project", overrides, files)
    for stage in ("prepare", "validate", "train", "evaluate"):
        run(["tollgate", stage], cwd=project)
    verdict = json.loads((project / paths.GATE_REPORT).read_text())
    assert verdict["passed"], verdict["reasons"]
    assert not verdict["warnings"] or all("latency" in w for w in verdict["warnings"])  # machine-dependent
