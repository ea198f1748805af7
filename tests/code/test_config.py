import pytest
import yaml
from pydantic import BaseModel

from pipeline.core.config import (
    ConfigError,
    Params,
    load_params,
    load_profile,
    parse_params,
    set_param_args,
    with_overrides,
)
from tests.support import ROOT


def test_params_yaml_loads_and_sets_every_field():
    params = load_params(ROOT / "params.yaml")
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    # Defaults in code must never silently stand in for a value: params.yaml spells out every knob.
    assert set(raw) == {f.alias or name for name, f in Params.model_fields.items()}
    for name, field in Params.model_fields.items():
        section = getattr(params, name)
        if isinstance(section, BaseModel):
            assert set(raw[field.alias or name]) == set(type(section).model_fields), name


@pytest.mark.parametrize(
    ("patch", "key", "why"),
    [
        ({"train": {"epoch": 3}}, "train.epoch", "unknown key"),
        ({"trian": {}}, "trian", "unknown key"),
        ({"train": {"epochs": "ten"}}, "train.epochs", "valid integer"),
        ({"train": {"epochs": 2.5}}, "train.epochs", "valid integer"),
        ({"data": {"download": "yes"}}, "data.download", "valid boolean"),
        ({"data": {"source": "imagenet"}}, "data.source", "digits"),
        ({"data": {"test_fraction": 1.5}}, "data.test_fraction", "less than 1"),
        ({"gate": {"compare_metrics": ["loss"]}}, "gate.compare_metrics.0", "accuracy"),
        ({"gate": {"warn_only": ["max_speed"]}}, "gate.warn_only.0", "min_accuracy"),
    ],
)
def test_bad_params_fail_naming_the_key(patch, key, why):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in patch.items():
        raw.setdefault(section, {}).update(values)
    with pytest.raises(ConfigError) as err:
        parse_params(raw)
    line = next(line for line in str(err.value).splitlines() if line.strip().startswith(key + ":"))
    assert why in line


def test_ints_are_accepted_where_floats_are_expected():
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert parse_params(with_overrides(raw, {"train.lr": 1})).train.lr == 1.0


def _fields(model: type[BaseModel], prefix: str = ""):
    for name, field in model.model_fields.items():
        key = prefix + (field.alias or name)
        yield key, field
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            yield from _fields(field.annotation, key + ".")


def test_every_value_lives_in_params_yaml_alone():
    # A default in the typed config would be a second copy of a value params.yaml spells out.
    defaults = [key for key, field in _fields(Params) if not field.is_required()]
    assert not defaults, f"defaults in pipeline/core/config.py (params.yaml is their one home): {defaults}"


def test_a_missing_key_fails_naming_it():
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    del raw["train"]["epochs"]
    with pytest.raises(ConfigError, match="train.epochs: missing"):
        parse_params(raw)


def test_a_moved_key_fails_naming_where_it_went():
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["serve"]["target"] = raw["promote"].pop("target")
    with pytest.raises(ConfigError) as err:
        parse_params(raw)
    assert "serve.target: moved to promote.target" in str(err.value)
    assert "promote.target: missing" in str(err.value)


def test_non_mapping_is_rejected(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_params(path)


def test_cli_reports_a_bad_key_and_exits_2(tmp_path, monkeypatch, capsys):
    from pipeline.cli import main

    (tmp_path / "params.yaml").write_text("train:\n  epoch: 3\n")
    monkeypatch.chdir(tmp_path)
    assert main(["prepare"]) == 2
    assert "train.epoch: unknown key" in capsys.readouterr().err


@pytest.mark.parametrize("profile", sorted((ROOT / "profiles").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_profile_is_valid_against_params_yaml(profile):
    overrides = load_profile(profile, ROOT / "params.yaml")
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    params = parse_params(with_overrides(raw, overrides))
    assert params.data.source == overrides["data.source"]


def test_overrides_use_dvc_set_param_semantics_and_reject_unknown_keys():
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert with_overrides(raw, {"train.lr": 0.1})["train"]["lr"] == 0.1
    assert raw["train"]["lr"] != 0.1  # the original mapping is left alone
    with pytest.raises(ConfigError, match="train.lrr: unknown key"):
        with_overrides(raw, {"train.lrr": 0.1})
    args = set_param_args({"train.lr": 0.1, "data.source": "mnist", "train.torchrun_args": ["--nnodes=2"]})
    assert args == ["-S", "train.lr=0.1", "-S", "data.source=mnist"] + [
        "-S",
        'train.torchrun_args=["--nnodes=2"]',
    ]
