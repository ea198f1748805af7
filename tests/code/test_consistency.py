"""dvc.yaml, params.yaml and the code describe one pipeline; these tests keep them from drifting."""

import ast
import re
from pathlib import Path

import yaml

from pipeline.core import codegraph, paths
from pipeline.core.config import STAGES, load_params
from tests.support import ROOT

PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())


def _resolve(text: str) -> str:
    """dvc.yaml's ${section.key} templating, filled from params.yaml as DVC does."""
    for match in re.findall(r"\$\{([\w.]+)\}", text):
        node = PARAMS
        for part in match.split("."):
            node = node[part]
        text = text.replace("${" + match + "}", str(node))
    return text


DVC = yaml.safe_load(_resolve((ROOT / "dvc.yaml").read_text()))


def _out_paths(stage: dict) -> set[str]:
    found = set()
    for kind in ("outs", "metrics", "plots"):
        for entry in stage.get(kind, []):
            found.add(entry if isinstance(entry, str) else next(iter(entry)))
    return found


def test_stages_match_the_cli_in_order():
    assert list(DVC["stages"]) == list(STAGES)
    for name, stage in DVC["stages"].items():
        assert stage["cmd"] == f"tollgate {name}"


def test_every_output_path_is_one_the_code_writes():
    declared = set().union(*(_out_paths(s) for s in DVC["stages"].values()))
    # runtime state (.tollgate/), the params file, what people apply by hand and the live-traffic reports
    # of `tollgate monitor` / `tollgate shadow` are not stage outputs
    code_paths = {v for k, v in vars(paths).items() if k.isupper() and not v.startswith(".tollgate/")} - {
        paths.PARAMS,
        paths.KSERVE_MANIFEST,
        paths.MONITOR_REPORT,
        paths.MONITOR_HTML,
        paths.SHADOW_REPORT,
    }
    assert declared == code_paths


def test_uncached_outputs_persist_so_a_failed_stage_keeps_the_previous_ones():
    for name, stage in DVC["stages"].items():
        for kind in ("outs", "metrics", "plots"):
            for entry in stage.get(kind, []):
                if isinstance(entry, dict):
                    ((path, opts),) = entry.items()
                    if opts.get("cache") is False:
                        gone = f"{name}: {path} would be deleted before the stage runs"
                        assert opts.get("persist") is True, gone


def test_each_stage_depends_on_the_outputs_it_reads():
    produced = {}
    for name, stage in DVC["stages"].items():
        for out in _out_paths(stage):
            produced[out] = name
    order = list(STAGES)
    for name, stage in DVC["stages"].items():
        for dep in stage.get("deps", []):
            assert Path(ROOT / dep).exists() or dep in produced, dep
            if dep in produced:
                assert order.index(produced[dep]) < order.index(name), f"{name} reads {dep} before it is made"
    # the chain is linear: every stage but the first reads something the previous one made
    for prev, name in zip(order, order[1:], strict=False):
        deps = set(DVC["stages"][name]["deps"])
        assert deps & _out_paths(DVC["stages"][prev]), f"{name} does not depend on {prev}"


def test_stage_params_exist_in_params_yaml():
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    load_params(ROOT / "params.yaml")
    for name, stage in DVC["stages"].items():
        for key in stage.get("params", []):
            node = raw
            for part in key.split("."):
                assert isinstance(node, dict) and part in node, f"stage {name}: {key} not in params.yaml"
                node = node[part]


def _stage_modules(name: str) -> set[str]:
    return codegraph.closure([f"pipeline.stages.{name}"])


def test_each_stage_depends_on_exactly_the_modules_it_runs():
    # A module a stage runs but does not list would let `dvc repro` call stale outputs up to date.
    for name, stage in DVC["stages"].items():
        listed = {d for d in stage["deps"] if d.startswith("pipeline/")}
        runs = set(codegraph.files(_stage_modules(name)))
        assert not runs - listed, f"stage {name}: dvc.yaml lacks deps {sorted(runs - listed)}"
        assert not listed - runs, f"stage {name}: dvc.yaml lists deps it does not run {sorted(listed - runs)}"
    shared = {
        "pipeline/core/config.py",
        "pipeline/core/paths.py",
        "pipeline/core/files.py",
        "pipeline/stages/__init__.py",
    }
    for name, stage in DVC["stages"].items():
        assert shared <= set(stage["deps"]), name


def test_the_module_graph_follows_lazy_imports_and_process_entry_points():
    modules = codegraph.closure(["pipeline.stages.register"])
    assert "pipeline.registry.pyfunc" in modules  # handed to MLflow as model-from-code
    assert "pipeline.serving.app" in modules  # infra validation starts it as a process
    assert "pipeline.data.expectations" not in modules and "pipeline.cli" not in modules
    # imported inside a function
    assert "pipeline.registry.runs" in codegraph.closure(["pipeline.stages.validate"])
    assert "pipeline" not in modules  # a package __init__ with no code is no dependency


def test_registration_runs_no_promotion_code():
    # Editing a serving target, the guard or promotion must not re-run infra validation.
    modules = codegraph.closure(["pipeline.stages.register"])
    assert not {m for m in modules if m.startswith("pipeline.release.targets")}, sorted(modules)
    assert "pipeline.release.guard" not in modules and "pipeline.release.promote" not in modules


# Where results are recorded and how machines take turns or follow, not what the results are: moving the
# tracking store must not retrain anything, nor a new replica or guard setting re-run a promotion, nor
# sampling more live traffic re-run the server's infra validation (whose candidate server samples nothing).
WHERE_NOT_WHAT = {
    "monitor",
    "data.feedback",
    "mlflow",
    "registry.experiment",
    "registry.guard",
    "registry.guard_timeout_s",
    "registry.guard_lease_s",
    "serve.follow_interval_s",
    "promote.replicas",
    "promote.start_timeout_s",  # how long a starting server is waited for, on a busy machine
    "flow",  # promote reads only who to notify of a rolled-back canary
}
ALIASES = {"validate_": "validate"}


def _params_read(modules: set[str]) -> set[str]:
    """Dotted keys read as `params.<section>[.<key>]` anywhere in `modules` (a whole section when the code
    takes the section itself); method calls such as `params.section_hash(...)` are not reads."""
    found = set()
    for module in modules:
        tree = ast.parse(codegraph.module_file(module).read_text())
        parent = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        for node in ast.walk(tree):
            # `params.x`, and `self.params.x` / `ctx.params.x` where a class or context holds them
            named = isinstance(node, ast.Name) and node.id == "params"
            if not (named or (isinstance(node, ast.Attribute) and node.attr == "params")):
                continue
            chain, top = [], node
            while isinstance(parent.get(top), ast.Attribute):
                top = parent[top]
                chain.append(top.attr)
            if isinstance(parent.get(top), ast.Call) and parent[top].func is top:
                chain = chain[:-1]
            if chain:
                found.add(".".join([ALIASES.get(chain[0], chain[0]), *chain[1:2]]))
    return found


def _covered(key: str, listed: set[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in listed)


def test_stage_params_cover_what_every_module_of_the_stage_reads():
    # A value a stage reads but dvc.yaml does not list would not re-run the stage when it changes.
    for name, stage in DVC["stages"].items():
        read = _params_read(_stage_modules(name))
        listed = set(stage.get("params", []))
        missing = {k for k in read if not _covered(k, listed) and not _covered(k, WHERE_NOT_WHAT)}
        assert not missing, f"stage {name} reads {sorted(missing)} but dvc.yaml does not list them"


def test_promote_depends_only_on_the_serve_values_promotion_reads():
    # Tuning the server (batching, timeouts) must not re-run promote and re-promote a rolled-back version.
    promote = set(DVC["stages"]["promote"]["params"])
    assert "serve" not in promote and "serve.max_latency_ms" not in promote
    read = _params_read(_stage_modules("promote")) - WHERE_NOT_WHAT
    assert {k for k in read if k.startswith("serve")} == {p for p in promote if p.startswith("serve")}
