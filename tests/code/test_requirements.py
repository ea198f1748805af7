"""The registered model loads outside tollgate's environment only if its pip requirements name every package
its code imports. Checked against what the code really imports when MLflow loads and runs it, for both
architectures (resnet18 pulls in torchvision), not against the static reading that produced the list."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pipeline.registry.versions import pip_requirements
from tests.support import ROOT

# Run in a fresh interpreter: every `import` statement executed by a module of the `pipeline` package is
# recorded (builtins.__import__ sees imports of modules already loaded too), while MLflow's pyfunc
# wrapper loads and runs a saved model of each architecture.
SPY = r"""
import builtins, json, sys, tempfile
seen = set()
real_import = builtins.__import__
def spy(name, globals=None, locals=None, fromlist=(), level=0):
    if level == 0 and (globals or {}).get("__name__", "").startswith("pipeline"):
        seen.add(name.split(".")[0])
    return real_import(name, globals, locals, fromlist, level)
builtins.__import__ = spy

import numpy as np
from pipeline.registry import pyfunc as mlflow_model
from pipeline.training import model
from pipeline.training.model_folder import MLFLOW_ARTIFACT
for arch in ("small_cnn", "resnet18"):
    meta = {"backbone": arch, "width": 4, "input_shape": [8, 8, 1], "classes": ["a", "b"],
            "normalization": {"mean": [0.5], "std": [0.25]}}
    with tempfile.TemporaryDirectory() as tmp:
        model.save(model.build(meta), meta, tmp)
        wrapped = mlflow_model.TollgateModel()
        wrapped.load_context(type("Context", (), {"artifacts": {MLFLOW_ARTIFACT: tmp}})())
        assert wrapped.predict(None, np.zeros((2, 8, 8, 1), dtype=np.float32)).shape == (2, 2)
ours = ("pipeline", "__future__")
print(json.dumps(sorted(n for n in seen if n not in sys.stdlib_module_names and n not in ours)))
"""


def test_pip_requirements_cover_every_package_the_model_code_imports_when_it_runs():
    from importlib.metadata import packages_distributions, version

    out = subprocess.run([sys.executable, "-c", SPY], cwd=ROOT, capture_output=True, text=True, check=True)
    imported = json.loads(out.stdout.splitlines()[-1])
    assert {"torch", "torchvision", "numpy", "mlflow"} <= set(imported)
    required = dict(r.split("==") for r in pip_requirements())
    providers = packages_distributions()
    for name in imported:
        assert any(dist in required for dist in providers[name]), f"{name} is imported but not required"
    for dist, pinned in required.items():
        assert pinned == version(dist), dist  # what this environment tested, exactly


def test_distributions_name_what_packages_distributions_reads_for_every_import_of_ours():
    """codegraph.distributions reads only the distributions that answer; the full reading of every
    installed file list (importlib.metadata.packages_distributions) must give the same names."""
    from importlib.metadata import packages_distributions

    from pipeline.core import codegraph

    modules = [
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for folder in codegraph.PACKAGES
        for p in (ROOT / folder).rglob("*.py")
    ]
    names = codegraph.third_party(codegraph.closure(modules))
    assert {"PIL", "yaml", "sklearn", "mlflow", "torch"} <= names  # renamed ones and a shared namespace
    known = packages_distributions()
    expected = {n: n if n in known[n] else known[n][0] for n in names}
    assert codegraph.distributions(names) == expected
    with pytest.raises(LookupError, match="no_such_import"):
        codegraph.distributions({"numpy", "no_such_import"})
