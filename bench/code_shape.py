"""The shape of the code, for a reader deciding where things go: modules and lines per folder, the longest
functions, the import arrows between our modules and any circle among them. Read from the source with
pipeline/core/codegraph.py (nothing is imported)."""

from __future__ import annotations

import ast
import collections
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.core import codegraph  # noqa: E402 - the checkout's own package, whatever is installed


def main() -> None:
    modules = codegraph.all_modules()
    per_folder: collections.Counter = collections.Counter()
    lines: collections.Counter = collections.Counter()
    functions = []
    for module in modules:
        path = codegraph.module_file(module)
        folder = path.parent.relative_to(codegraph.ROOT).as_posix()
        per_folder[folder] += 1
        lines[folder] += len(path.read_text().splitlines())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                functions.append((node.end_lineno - node.lineno + 1, f"{module}.{node.name}"))
    arrows = {(m, d) for m in modules for d in codegraph.imports(m)}
    print(f"{len(modules)} modules, {sum(lines.values())} lines, {len(functions)} functions")
    for folder in sorted(per_folder):
        print(f"  {folder:<28} {per_folder[folder]:>3} modules {lines[folder]:>6} lines")
    print("longest functions (lines):")
    for n, name in sorted(functions, reverse=True)[:8]:
        print(f"  {n:>4}  {name}")
    print(f"import arrows between our modules: {len(arrows)}")


if __name__ == "__main__":
    main()
