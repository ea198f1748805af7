"""Typed view of params.yaml: the only place values live.

Every section is a frozen model that forbids unknown keys, so a typo ("epoch:") fails before any
work starts, with the dotted key in the message, instead of being silently ignored. No field has a default
here: each value is written once, in params.yaml, and a key missing there fails by name too
(tests/code/test_config.py checks that no default creeps back in).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class _Section(BaseModel):
    # strict: "10" is not an int and 1 is not a bool; ints are still accepted where floats are expected.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


BACKBONE = "backbone"  # data.image_size / data.interpolation: as train.backbone's pretrained weights expect


class DataConfig(_Section):
    source: Literal["digits", "mnist", "fashion_mnist", "cifar10", "imagefolder"]
    root: str
    download: bool
    # "backbone": what train.backbone's pretrained weights were trained on (resolved by the prepare stage)
    image_size: (
        Annotated[list[Annotated[int, Field(ge=1)]], Field(min_length=2, max_length=2)]
        | Literal["backbone"]
        | None
    )
    channels: Literal[0, 1, 3]
    decode_workers: int = Field(ge=0)
    interpolation: Literal["bilinear", "bicubic", "backbone"]
    val_fraction: float = Field(ge=0.0, lt=1.0)
    test_fraction: float = Field(gt=0.0, lt=1.0)
    feedback: str
    use_feedback: bool
    feedback_holdout: float = Field(gt=0.0, lt=1.0)

    @model_validator(mode="after")
    def _folders_need_a_size(self) -> DataConfig:
        if self.source == "imagefolder" and self.image_size is None:
            raise ValueError("image_size: required for imagefolder (images of any size are resized to it)")
        return self


ValidationCheck = Literal[
    "unreadable_files",
    "non_image_files",
    "min_per_class",
    "class_imbalance",
    "leakage",
    "duplicates",
    "channels",
    "image_size",
    "constant_images",
    "labels",
    "pixel_values",
    "min_images",
    "unseen_test_classes",
    "shape",
]


class ValidateConfig(_Section):
    min_per_class: int = Field(ge=1)
    min_train_images: int = Field(ge=1)
    max_class_ratio: float = Field(ge=1.0)
    max_duplicate_fraction: float = Field(ge=0.0, le=1.0)
    min_image_side: int = Field(ge=1)
    max_image_side: int = Field(ge=1)
    pixel_min: int = Field(ge=0, le=255)
    pixel_max: int = Field(ge=0, le=255)
    warn_only: list[ValidationCheck]


class TrainConfig(_Section):
    backbone: str = Field(min_length=1)  # checked against timm's registry when training starts
    pretrained: str = Field(min_length=1)
    download_weights: bool
    backbone_lr: float = Field(ge=0.0, le=1.0)
    freeze_epochs: int = Field(ge=0)
    width: int = Field(ge=1)
    epochs: int = Field(ge=0)
    batch_size: int = Field(ge=1)
    optimizer: Literal["adamw", "sgd"]
    lr: float = Field(gt=0.0)
    momentum: float = Field(ge=0.0, lt=1.0)
    weight_decay: float = Field(ge=0.0)
    schedule: Literal["onecycle", "cosine"]
    warmup: float = Field(ge=0.0, lt=1.0)
    label_smoothing: float = Field(ge=0.0, lt=1.0)
    calibrate: bool
    shift_pixels: int = Field(ge=0)
    flip: bool
    crop_scale: float = Field(gt=0.0, le=1.0)
    color_jitter: float = Field(ge=0.0, lt=1.0)
    early_stopping: int = Field(ge=0)
    device: Literal["auto", "cpu", "cuda", "mps"]
    precision: Literal["auto", "fp32", "bf16"]
    channels_last: Literal["auto", "on", "off"]
    compile: bool
    deterministic: bool
    threads: int = Field(ge=0)
    wait_policy: Literal["auto", "spin", "passive"]
    in_memory_mb: int = Field(ge=0)
    loader_workers: int = Field(ge=0)
    nproc_per_node: int = Field(ge=1)
    torchrun_args: list[str]
    backend: Literal["auto", "gloo", "nccl"]
    reference_samples: int = Field(ge=10)
    reference_components: int = Field(ge=1)


class EvaluateConfig(_Section):
    top_k: int = Field(ge=1)
    ece_bins: int = Field(ge=1)
    throughput_batch: int = Field(ge=1)
    timing_runs: int = Field(ge=1)
    shift_pixels: int = Field(ge=0)
    check_flips: bool
    mistake_pairs: int = Field(ge=0)
    mistakes_per_pair: int = Field(ge=1)


Metric = Literal["accuracy", "macro_f1"]
GateCheck = Literal[
    "min_accuracy",
    "min_macro_f1",
    "min_class_recall",
    "max_ece",
    "max_p99_latency_ms",
    "max_model_mb",
    "min_shift_stability",
    "max_drop",
    "significance",
    "max_feedback_drop",
]


class GateConfig(_Section):
    min_accuracy: float = Field(ge=0.0, le=1.0)
    min_macro_f1: float = Field(ge=0.0, le=1.0)
    min_class_recall: float = Field(ge=0.0, le=1.0)
    max_ece: float = Field(ge=0.0, le=1.0)
    max_p99_latency_ms: float = Field(gt=0.0)
    max_model_mb: float = Field(gt=0.0)
    min_shift_stability: float = Field(ge=0.0, le=1.0)
    max_drop: float = Field(ge=0.0, le=1.0)
    significance: float = Field(gt=0.0, lt=1.0)
    drop_mode: Literal["absolute", "relative"]
    compare_metrics: list[Metric] = Field(min_length=1)
    max_feedback_drop: float = Field(ge=0.0, le=1.0)
    warn_only: list[GateCheck]
    min_agreement: float = Field(ge=0.0, le=1.0)
    max_quantized_drop: float = Field(ge=0.0, le=1.0)


class RegistryConfig(_Section):
    model_name: str = Field(min_length=1)
    experiment: str = Field(min_length=1)
    guard: Literal["auto", "prefect", "postgres", "file"]
    guard_timeout_s: float = Field(gt=0.0)
    guard_lease_s: float = Field(ge=60.0)  # Prefect's shortest lease


class ServeConfig(_Section):
    host: str
    port: int = Field(ge=1, le=65535)
    max_batch_size: int = Field(ge=1)
    max_latency_ms: float = Field(ge=0.0)
    threads: int = Field(ge=0)
    runtime: Literal["torch", "onnx", "onnx-int8"]
    max_body_mb: float = Field(gt=0.0)
    max_request_images: int = Field(ge=1)
    max_image_pixels: int = Field(ge=1)
    header_timeout_s: float = Field(gt=0.0)
    body_timeout_s: float = Field(gt=0.0)
    max_connections: int = Field(ge=1)
    follow_interval_s: float = Field(ge=0.0)
    shadow: bool
    shadow_queue: int = Field(ge=1)
    api_docs: bool


Target = Literal["local", "mlflow", "kserve", "torchserve"]  # pipeline/release/targets has one of each


class CanaryConfig(_Section):
    """promote.strategy canary: the steps of a rollout and what its analysis accepts (pipeline/evaluation/
    canary.py)."""

    steps: Annotated[list[Annotated[float, Field(gt=0.0, le=100.0)]], Field(min_length=1)]
    min_requests: int = Field(ge=1)
    min_s: float = Field(ge=0.0)
    max_s: float = Field(gt=0.0)
    max_error_rate: float = Field(ge=0.0, le=1.0)
    max_p99_ms: float = Field(gt=0.0)
    rank_effect: float = Field(ge=0.0, lt=0.5)
    min_labels: int = Field(ge=1)
    alpha: float = Field(gt=0.0, lt=1.0)

    @model_validator(mode="after")
    def _steps_rise_to_all(self) -> CanaryConfig:
        if self.steps != sorted(set(self.steps)) or self.steps[-1] != 100.0:
            raise ValueError("steps: rising percentages that end at 100 (e.g. [5, 25, 50, 100])")
        if self.max_s < self.min_s:
            raise ValueError("max_s: must be at least min_s")
        return self


class PromoteConfig(_Section):
    target: Target
    strategy: Literal["direct", "canary"]
    canary: CanaryConfig
    smoke_images: int = Field(ge=1)
    timeout_s: float = Field(gt=0.0)
    start_timeout_s: float = Field(gt=0.0)
    replicas: list[str]
    require_clean: bool
    shadow_min_requests: int = Field(ge=0)
    shadow_max_disagreement: float = Field(ge=0.0, le=1.0)


class TorchServeConfig(_Section):
    folder: str
    inference_port: int = Field(ge=1, le=65535)
    management_port: int = Field(ge=1, le=65535)
    metrics_port: int = Field(ge=1, le=65535)
    workers: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    max_batch_delay_ms: int = Field(ge=0)
    token_auth: bool


DriftCheck = Literal["prediction", "confidence", "input", "embedding", "mmd"]


class MonitorConfig(_Section):
    sample_fraction: float = Field(ge=0.0, le=1.0)
    folder: str
    queue_size: int = Field(ge=1)
    shard_samples: int = Field(ge=1)
    flush_s: float = Field(gt=0.0)
    max_mb: float = Field(gt=0.0)
    retention_h: float = Field(gt=0.0)
    window: int = Field(ge=10)
    min_samples: int = Field(ge=10)
    p_value: float = Field(gt=0.0, lt=1.0)
    max_prediction_shift: float = Field(gt=0.0, le=1.0)
    max_confidence_drop: float = Field(gt=0.0, le=1.0)
    max_input_shift: float = Field(gt=0.0, le=1.0)
    max_embedding_shift: float = Field(gt=0.0, le=1.0)
    max_mmd: float = Field(gt=0.0)
    mmd_permutations: int = Field(ge=10)
    max_accuracy_drop: float = Field(gt=0.0, le=1.0)
    blocking_checks: list[DriftCheck]
    metrics_every: int = Field(ge=1)
    feedback_max_mb: float = Field(gt=0.0)
    retrain_deployment: str


# The pipeline's stages in order: dvc.yaml declares them, `tollgate <stage>` runs one, the flow runs them all.
STAGES = ("prepare", "validate", "train", "evaluate", "register", "promote")
StageName = Literal[STAGES]


class FlowConfig(_Section):
    timeout_s: dict[StageName, float]
    retries: dict[StageName, int]
    retry_backoff_s: float = Field(ge=0.0)
    lock_timeout_s: float = Field(ge=0.0)
    notify_url: str
    notify_block: str


class MlflowConfig(_Section):
    tracking_uri: str
    artifact_root: str
    artifacts_destination: str
    system_metrics_s: float = Field(ge=0.0)
    http_retries: int = Field(ge=0)
    http_backoff_s: int = Field(ge=0)
    http_timeout_s: int = Field(ge=1)
    outage_s: float = Field(ge=0.0)


class StackConfig(_Section):
    folder: str
    postgres_port: int = Field(ge=1, le=65535)
    s3_port: int = Field(ge=1, le=65535)
    mlflow_port: int = Field(ge=1, le=65535)
    prefect_port: int = Field(ge=1, le=65535)
    bucket: str = Field(min_length=3)
    start_timeout_s: float = Field(gt=0.0)


class Params(_Section):
    seed: int
    data: DataConfig
    validate_: ValidateConfig = Field(alias="validate")
    train: TrainConfig
    evaluate: EvaluateConfig
    gate: GateConfig
    registry: RegistryConfig
    serve: ServeConfig
    promote: PromoteConfig
    torchserve: TorchServeConfig
    monitor: MonitorConfig
    flow: FlowConfig
    mlflow: MlflowConfig
    stack: StackConfig

    def section_hash(self, *sections: str) -> str:
        """Short, stable hash of the named sections: the params fingerprint tagged on models."""
        dumped = self.model_dump(mode="json", by_alias=True)
        blob = json.dumps({s: dumped[s] for s in sections}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


class ConfigError(ValueError):
    """params.yaml is malformed; the message names each offending key."""


# Keys that moved: an old params.yaml fails naming where each went.
MOVED = {
    f"serve.{key}": f"promote.{key}"
    for key in ("target", "smoke_images", "timeout_s", "replicas", "shadow_min_requests",
                "shadow_max_disagreement")
}  # fmt: skip


def _describe(err: ValidationError, source: str) -> str:
    lines = [f"{source} is invalid:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden" and key in MOVED:
            lines.append(f"  {key}: moved to {MOVED[key]} (promotion policy lives in promote:)")
        elif e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key (typo? allowed keys are in pipeline/core/config.py)")
        elif e["type"] == "missing":
            lines.append(f"  {key}: missing (params.yaml sets every value; see the shipped params.yaml)")
        else:
            lines.append(f"  {key}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def parse_params(raw: object, source: str = "params.yaml") -> Params:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source} must be a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_describe(err, source)) from None


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path} not found: run tollgate from the project root") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    return parse_params(raw, str(path))


def set_dotted(mapping: dict, overrides: dict[str, object], source: str = "overrides") -> None:
    """Set dotted keys (`train.lr: 0.1`) in a nested mapping in place, creating sections as needed."""
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = mapping
        for key in parents:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{source}: {dotted}: {key} is not a section")
        node[leaf] = value


def with_overrides(raw: dict, overrides: dict[str, object], source: str = "overrides") -> dict:
    """A copy of the params mapping `raw` with dotted keys set, as `dvc exp run --set-param` does; the
    result is checked like params.yaml, so a mistyped key fails by name."""
    import copy

    out = copy.deepcopy(raw)
    set_dotted(out, overrides, source)
    parse_params(out, source)
    return out


def load_profile(path: str | Path, params_path: str | Path = "params.yaml") -> dict[str, object]:
    """A profile file: params.yaml overrides as dotted keys, checked against the params file."""
    path = Path(path)
    overrides = yaml.safe_load(path.read_text()) or {}
    if not isinstance(overrides, dict):
        raise ConfigError(f"{path} must map dotted keys (train.lr) to values")
    with_overrides(yaml.safe_load(Path(params_path).read_text()) or {}, overrides, str(path))
    return overrides


def set_param_args(overrides: dict[str, object]) -> list[str]:
    """`dvc exp run` arguments setting these values; JSON is YAML, so lists and numbers keep their types."""
    return [
        arg
        for key, value in overrides.items()
        for arg in ("-S", f"{key}={value if isinstance(value, str) else json.dumps(value)}")
    ]
