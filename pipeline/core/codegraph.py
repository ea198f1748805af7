"""Which of tollgate's own modules a piece of code runs, read from the source (no imports executed).

Three users need the same answer: dvc.yaml lists each stage's modules as deps (a test derives the list from
here), a training checkpoint is only resumed by the same code (its fingerprint hashes these files), and a
registered model's pip requirements name what its code imports.

A module runs another when it imports it (at the top or inside a function) or names it in a module-level
constant (`SERVER = "pipeline.serving.app"`): that is how code is handed to another process, `python -m`
or MLflow's model-from-code. Importing a module also runs the `__init__` of every package above it; those
with no statements are left out. The same reading gives the import graph that the architecture test
checks against the layer order (`imports`, `all_modules`).
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import inspect
import sys
from collections.abc import Iterable
from functools import cache
from pathlib import Path

PACKAGE = "pipeline"  # the library
PACKAGES = (PACKAGE, "flows")  # ours: the library and its Prefect wiring
ROOT = Path(__file__).resolve().parents[2]  # the folder holding the `pipeline` package


def module_file(module: str) -> Path | None:
    """The source file of one of our modules, or None when `module` is not ours."""
    if module.split(".")[0] not in PACKAGES:
        return None
    base = ROOT.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


@cache
def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), str(path))


def _imported(tree: ast.Module) -> set[str]:
    """Absolute names of every module imported anywhere in `tree`."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            # `from pipeline import model` imports the module pipeline.model
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _named(tree: ast.Module) -> set[str]:
    """Strings assigned to module-level names: the modules among them run in another process."""
    return {
        node.value.value
        for node in tree.body
        if isinstance(node, ast.Assign)
        and isinstance(node.value, ast.Constant)
        and isinstance(node.value.value, str)
    }


def _has_code(path: Path) -> bool:
    body = _tree(path).body
    docstring = body[:1] and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
    return len(body) > (1 if docstring else 0)


def imports(module: str) -> set[str]:
    """Our modules that `module` itself runs: imported anywhere in it, or named as a process entry."""
    tree = _tree(module_file(module))
    return {m for m in _imported(tree) | _named(tree) if module_file(m) is not None and m != module}


def all_modules() -> list[str]:
    """Every module of ours, by dotted name."""
    found = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return found


def closure(entries: Iterable[str]) -> set[str]:
    """Our modules that running `entries` runs, the entries included."""
    seen: set[str] = set()
    todo = list(entries)
    while todo:
        module = todo.pop()
        if module in seen or module_file(module) is None:
            continue
        seen.add(module)
        parts = module.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # package __init__s run first
        todo += imports(module)
    return {m for m in seen if _has_code(module_file(m))}


def files(modules: Iterable[str]) -> list[str]:
    """Project-relative paths of `modules`, sorted: the form dvc.yaml lists deps in."""
    return sorted(module_file(m).relative_to(ROOT).as_posix() for m in modules)


def digest(modules: Iterable[str]) -> str:
    """One hash over the source of `modules`: changes when any of their code does."""
    h = hashlib.sha256()
    for rel in files(modules):
        h.update(rel.encode() + b"\0" + (ROOT / rel).read_bytes() + b"\0")
    return h.hexdigest()


def third_party(modules: Iterable[str]) -> set[str]:
    """Top-level names of the packages outside the standard library that `modules` import."""
    names = {name.split(".")[0] for m in modules for name in _imported(_tree(module_file(m)))}
    return {n for n in names if n not in PACKAGES and n not in sys.stdlib_module_names and n != "__future__"}


def distributions(top_level: Iterable[str]) -> dict[str, str]:
    """The installed distribution providing each top-level import name (`yaml` -> `PyYAML`); where several
    do (`mlflow` is in mlflow, mlflow-skinny, ...), the one named like the import. Read from the few
    distributions that answer: importlib.metadata.packages_distributions() reads every installed file list
    (~1 s here), on the path of every registration."""
    from importlib.metadata import PackageNotFoundError, distribution
    from importlib.metadata import distributions as installed

    wanted, out = set(top_level), {}
    for name in wanted:
        with contextlib.suppress(PackageNotFoundError):
            if name in _provided(dist := distribution(name), infer=True):
                out[name] = dist.metadata["Name"]
    for infer in (False, True):  # declared top_level.txt first: reading file lists is the slow part
        for dist in installed() if wanted - out.keys() else ():
            for name in (wanted - out.keys()) & _provided(dist, infer):
                out[name] = dist.metadata["Name"]
    if missing := wanted - out.keys():
        raise LookupError(f"no installed distribution provides the import {sorted(missing)[0]!r}")
    return out


def _provided(dist, infer: bool) -> set[str]:
    """The top-level import names `dist` declares (top_level.txt), or with `infer`, those its file list
    holds when it declares none (as packages_distributions reads them)."""
    declared = dist.read_text("top_level.txt")
    if declared is not None:
        return set(declared.split())
    if not infer:
        return set()
    return {f.parts[0] if len(f.parts) > 1 else inspect.getmodulename(f) for f in dist.files or ()} - {None}


def rewrite_stage_deps(dvc_yaml: Path) -> str:
    """dvc.yaml's text with each stage's `pipeline/` deps replaced by the modules its command runs
    (`python -m pipeline.core.codegraph` writes it back): what tests/code/test_consistency.py checks."""
    import re

    out, stage, in_deps = [], None, False
    for line in dvc_yaml.read_text().splitlines():
        if m := re.match(r"^  (\w+):$", line):
            stage = m.group(1)
        if line == "    deps:":
            in_deps = True
        elif in_deps and not line.startswith("      - "):
            out += [f"      - {f}" for f in files(closure([f"{PACKAGE}.stages.{stage}"]))]
            in_deps = False
        if not (in_deps and line.startswith("      - pipeline/")):
            out.append(line)
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    (ROOT / "dvc.yaml").write_text(rewrite_stage_deps(ROOT / "dvc.yaml"))
