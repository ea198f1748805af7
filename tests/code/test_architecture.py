"""The rooms and the layers: each domain folder imports only the layers below it, no module imports itself
round a circle, and MLflow is touched by the registry alone. The graph is read from the source by
pipeline/core/codegraph.py, the same reading that derives dvc.yaml's deps."""

from __future__ import annotations

import ast

from pipeline.core import codegraph

# Lowest first. A module may import its own layer's modules and any layer below it, never one above:
# docs/architecture.md draws this order.
LAYERS = (
    "pipeline.core",
    "pipeline.stack",
    "pipeline.data",
    "pipeline.training",
    "pipeline.registry",
    "pipeline.monitoring",
    "pipeline.evaluation",
    "pipeline.serving",
    "pipeline.release",
    "pipeline.stages",
    "flows",
    "pipeline.cli",
)


def layer(module: str) -> int:
    """The rank of the layer `module` lives in (-1: a package root such as `pipeline` itself)."""
    ranks = [i for i, name in enumerate(LAYERS) if module == name or module.startswith(name + ".")]
    return ranks[0] if ranks else -1


def _graph() -> dict[str, set[str]]:
    return {m: codegraph.imports(m) for m in codegraph.all_modules()}


def test_every_module_lives_in_a_declared_layer():
    homeless = [m for m in codegraph.all_modules() if layer(m) < 0 and m not in ("pipeline", "flows")]
    assert not homeless, f"modules outside the declared layers: {homeless}"


def test_imports_only_point_down_the_layers():
    upward = [
        f"{m} ({LAYERS[layer(m)]}) imports {d} ({LAYERS[layer(d)]})"
        for m, deps in _graph().items()
        for d in sorted(deps)
        if layer(d) > layer(m)
    ]
    assert not upward, "imports against the layer order:\n" + "\n".join(upward)


def _reach(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every module `start` leads to through one import or more (itself only round a circle)."""
    seen: set[str] = set()
    todo = list(graph.get(start, ()))
    while todo:
        v = todo.pop()
        if v not in seen:
            seen.add(v)
            todo += graph.get(v, ())
    return seen


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each group of modules that import one another round a circle, sorted."""
    reach = {v: _reach(graph, v) for v in graph}
    circles = {tuple(sorted(w for w in reach[v] if v in reach.get(w, ()))) for v in graph if v in reach[v]}
    return sorted(list(c) for c in circles)


def test_no_import_circles():
    assert not _circles(_graph()), f"import circles: {_circles(_graph())}"


def test_the_circle_finder_finds_a_circle():
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_only_the_registry_imports_mlflow():
    importers = [
        m
        for m in codegraph.all_modules()
        if not m.startswith("pipeline.registry")
        and any(
            name == "mlflow" or name.startswith("mlflow.")
            for name in codegraph._imported(ast.parse(codegraph.module_file(m).read_text()))
        )
    ]
    assert not importers, f"mlflow imported outside pipeline/registry: {importers}"


def test_the_server_never_imports_promotion():
    serving = [m for m in codegraph.all_modules() if m.startswith("pipeline.serving")]
    reached = codegraph.closure(serving)
    assert not {m for m in reached if m.startswith("pipeline.release")}, sorted(reached)


def test_only_the_cli_imports_flows():
    importers = [
        m
        for m, deps in _graph().items()
        if not m.startswith(("pipeline.cli", "flows")) and any(d.split(".")[0] == "flows" for d in deps)
    ]
    assert not importers, f"flows imported outside the CLI: {importers}"


def test_a_stage_that_runs_no_network_never_loads_torch_or_mlflow_when_it_starts():
    """Loading torch costs a stage process ~1.7 s and MLflow ~2 s (docs/benchmarks.md): the stages that do
    not compute with a network load neither at start-up, and load MLflow only when they reach the store.
    Register on the default runtime copies the model folder; only an ONNX artefact needs torch there."""
    import subprocess
    import sys

    child = (
        "import sys, importlib\n"
        "importlib.import_module('pipeline.stages.' + sys.argv[1])\n"
        "print(sorted(m for m in ('torch', 'mlflow') if m in sys.modules))\n"
    )
    for stage in ("prepare", "validate", "register", "promote"):
        proc = subprocess.run([sys.executable, "-c", child, stage], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == "[]", (stage, proc.stdout)
