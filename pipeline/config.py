"""Typed view of params.yaml: the only place values live.

Every section is a frozen model that forbids unknown keys, so a typo ("epoch:") fails before any
work starts, with the dotted key in the message, instead of being silently ignored.
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


class DataConfig(_Section):
    source: Literal["digits", "mnist", "fashion_mnist", "cifar10", "imagefolder"] = "digits"
    root: str = "data/raw"
    download: bool = False
    image_size: list[Annotated[int, Field(ge=1)]] | None = Field(None, min_length=2, max_length=2)
    channels: Literal[0, 1, 3] = 0
    val_fraction: float = Field(0.15, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    feedback: str = "data/feedback"
    use_feedback: bool = False
    feedback_holdout: float = Field(0.3, gt=0.0, lt=1.0)

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
    min_per_class: int = Field(2, ge=1)
    min_train_images: int = Field(20, ge=1)
    max_class_ratio: float = Field(10.0, ge=1.0)
    max_duplicate_fraction: float = Field(0.05, ge=0.0, le=1.0)
    min_image_side: int = Field(8, ge=1)
    max_image_side: int = Field(8192, ge=1)
    pixel_min: int = Field(0, ge=0, le=255)
    pixel_max: int = Field(255, ge=0, le=255)
    warn_only: list[ValidationCheck] = Field(default_factory=list)


class TrainConfig(_Section):
    arch: Literal["small_cnn", "resnet18"] = "small_cnn"
    width: int = Field(32, ge=1)
    epochs: int = Field(15, ge=0)
    batch_size: int = Field(64, ge=1)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(3e-3, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(5e-4, ge=0.0)
    schedule: Literal["onecycle", "cosine"] = "onecycle"
    warmup: float = Field(0.3, ge=0.0, lt=1.0)
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    shift_pixels: int = Field(0, ge=0)
    flip: bool = False
    early_stopping: int = Field(0, ge=0)
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    channels_last: Literal["auto", "on", "off"] = "auto"
    compile: bool = False
    deterministic: bool = False
    threads: int = Field(0, ge=0)
    in_memory_mb: int = Field(4096, ge=0)
    loader_workers: int = Field(2, ge=0)
    nproc_per_node: int = Field(1, ge=1)
    torchrun_args: list[str] = Field(default_factory=list)
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    reference_samples: int = Field(2000, ge=10)
    reference_components: int = Field(8, ge=1)


class EvaluateConfig(_Section):
    top_k: int = Field(3, ge=1)
    ece_bins: int = Field(15, ge=1)
    throughput_batch: int = Field(256, ge=1)
    timing_runs: int = Field(30, ge=1)
    shift_pixels: int = Field(1, ge=0)
    check_flips: bool = False


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
    "max_feedback_drop",
]


class GateConfig(_Section):
    min_accuracy: float = Field(0.9, ge=0.0, le=1.0)
    min_macro_f1: float = Field(0.9, ge=0.0, le=1.0)
    min_class_recall: float = Field(0.8, ge=0.0, le=1.0)
    max_ece: float = Field(0.1, ge=0.0, le=1.0)
    max_p99_latency_ms: float = Field(50.0, gt=0.0)
    max_model_mb: float = Field(50.0, gt=0.0)
    min_shift_stability: float = Field(0.5, ge=0.0, le=1.0)
    max_drop: float = Field(0.01, ge=0.0, le=1.0)
    drop_mode: Literal["absolute", "relative"] = "absolute"
    compare_metrics: list[Metric] = Field(default_factory=lambda: ["accuracy", "macro_f1"], min_length=1)
    max_feedback_drop: float = Field(0.0, ge=0.0, le=1.0)
    warn_only: list[GateCheck] = Field(default_factory=list)


class RegistryConfig(_Section):
    model_name: str = Field("tollgate-classifier", min_length=1)
    experiment: str = Field("tollgate", min_length=1)
    guard: Literal["auto", "prefect", "postgres", "file"] = "auto"
    guard_timeout_s: float = Field(600.0, gt=0.0)
    guard_lease_s: float = Field(60.0, ge=60.0)  # Prefect's shortest lease


class ServeConfig(_Section):
    target: Literal["local", "mlflow", "kserve", "torchserve"] = "local"
    host: str = "127.0.0.1"
    port: int = Field(8765, ge=1, le=65535)
    max_batch_size: int = Field(64, ge=1)
    max_latency_ms: float = Field(2.0, ge=0.0)
    threads: int = Field(1, ge=0)
    max_body_mb: float = Field(10.0, gt=0.0)
    max_request_images: int = Field(1024, ge=1)
    max_image_pixels: int = Field(16_000_000, ge=1)
    header_timeout_s: float = Field(10.0, gt=0.0)
    body_timeout_s: float = Field(30.0, gt=0.0)
    max_connections: int = Field(512, ge=1)
    smoke_images: int = Field(16, ge=1)
    timeout_s: float = Field(30.0, gt=0.0)
    follow_interval_s: float = Field(30.0, ge=0.0)
    replicas: list[str] = Field(default_factory=list)
    shadow: bool = False
    shadow_queue: int = Field(256, ge=1)
    shadow_min_requests: int = Field(0, ge=0)
    shadow_max_disagreement: float = Field(1.0, ge=0.0, le=1.0)


class TorchServeConfig(_Section):
    folder: str = "deploy/torchserve"
    inference_port: int = Field(8080, ge=1, le=65535)
    management_port: int = Field(8081, ge=1, le=65535)
    metrics_port: int = Field(8082, ge=1, le=65535)
    workers: int = Field(1, ge=1)
    batch_size: int = Field(16, ge=1)
    max_batch_delay_ms: int = Field(2, ge=0)
    token_auth: bool = True


class MonitorConfig(_Section):
    sample_fraction: float = Field(0.1, ge=0.0, le=1.0)
    folder: str = "data/live"
    queue_size: int = Field(4096, ge=1)
    shard_samples: int = Field(1024, ge=1)
    flush_s: float = Field(5.0, gt=0.0)
    max_mb: float = Field(1024.0, gt=0.0)
    retention_h: float = Field(168.0, gt=0.0)
    window: int = Field(500, ge=10)
    min_samples: int = Field(200, ge=10)
    p_value: float = Field(0.01, gt=0.0, lt=1.0)
    max_prediction_shift: float = Field(0.1, gt=0.0, le=1.0)
    max_confidence_drop: float = Field(0.05, gt=0.0, le=1.0)
    max_input_shift: float = Field(0.2, gt=0.0, le=1.0)
    max_embedding_shift: float = Field(0.2, gt=0.0, le=1.0)
    metrics_every: int = Field(100, ge=1)
    retrain_deployment: str = "training-pipeline/retrain-on-drift"


# The pipeline's stages in order: dvc.yaml declares them, `tollgate <stage>` runs one, the flow runs them all.
STAGES = ("prepare", "validate", "train", "evaluate", "register", "promote")
StageName = Literal[STAGES]


class FlowConfig(_Section):
    timeout_s: dict[StageName, float] = Field(default_factory=dict)
    retries: dict[StageName, int] = Field(default_factory=dict)
    retry_backoff_s: float = Field(10.0, ge=0.0)
    lock_timeout_s: float = Field(3600.0, ge=0.0)
    notify_url: str = ""
    notify_block: str = ""


class MlflowConfig(_Section):
    tracking_uri: str = "sqlite:///mlflow.db"
    artifact_root: str = "mlartifacts"
    artifacts_destination: str = ""
    system_metrics_s: float = Field(2.0, ge=0.0)
    http_retries: int = Field(5, ge=0)
    http_backoff_s: int = Field(1, ge=0)
    http_timeout_s: int = Field(20, ge=1)


class StackConfig(_Section):
    folder: str = ".tollgate/stack"
    postgres_port: int = Field(15432, ge=1, le=65535)
    s3_port: int = Field(19000, ge=1, le=65535)
    mlflow_port: int = Field(15000, ge=1, le=65535)
    prefect_port: int = Field(14200, ge=1, le=65535)
    bucket: str = Field("tollgate", min_length=3)
    start_timeout_s: float = Field(120.0, gt=0.0)


class Params(_Section):
    seed: int = 42
    data: DataConfig = DataConfig()
    validate_: ValidateConfig = Field(ValidateConfig(), alias="validate")
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    gate: GateConfig = GateConfig()
    registry: RegistryConfig = RegistryConfig()
    serve: ServeConfig = ServeConfig()
    torchserve: TorchServeConfig = TorchServeConfig()
    monitor: MonitorConfig = MonitorConfig()
    flow: FlowConfig = FlowConfig()
    mlflow: MlflowConfig = MlflowConfig()
    stack: StackConfig = StackConfig()

    def section_hash(self, *sections: str) -> str:
        """Short, stable hash of the named sections: the params fingerprint tagged on models."""
        dumped = self.model_dump(mode="json", by_alias=True)
        blob = json.dumps({s: dumped[s] for s in sections}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


class ConfigError(ValueError):
    """params.yaml is malformed; the message names each offending key."""


def _describe(err: ValidationError, source: str) -> str:
    lines = [f"{source} is invalid:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key (typo? allowed keys are in pipeline/config.py)")
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
