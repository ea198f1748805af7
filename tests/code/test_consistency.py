"""dvc.yaml, params.yaml and the code describe one pipeline; these tests keep them from drifting."""

import ast
import re
from pathlib import Path

import yaml

from pipeline import paths
from pipeline.cli import STAGES
from pipeline.config import load_params
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
    code_paths = {v for k, v in vars(paths).items() if k.isupper()} - {
        paths.PARAMS,
        paths.SERVER_STATE,
        paths.TRAIN_CHECKPOINT,
        paths.KSERVE_MANIFEST,
    }
    assert declared == code_paths


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


# Where results are recorded, not what they are: moving the tracking store must not retrain anything.
WHERE_NOT_WHAT = {"mlflow", "registry", "section_hash"}
ALIASES = {"validate_": "validate"}


def _params_read(path: Path, func: str | None = None) -> set[str]:
    """Sections read as `params.<section>` in a module, or in one of its functions."""
    tree = ast.parse(path.read_text())
    scopes = (
        [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == func] if func else [tree]
    )
    return {
        ALIASES.get(n.attr, n.attr)
        for scope in scopes
        for n in ast.walk(scope)
        if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "params"
    }


def test_stage_params_cover_what_the_stage_reads():
    # A value a stage reads but dvc.yaml does not list would not re-run the stage when it changes.
    helpers = {"register": "registry.py", "promote": "promote.py"}
    for name, stage in DVC["stages"].items():
        read = _params_read(ROOT / "pipeline" / "stages.py", name)
        if name in helpers:
            read |= _params_read(ROOT / "pipeline" / helpers[name])
        listed = {p.split(".")[0] for p in stage.get("params", [])}
        assert read - WHERE_NOT_WHAT <= listed, (name, read - WHERE_NOT_WHAT - listed)
