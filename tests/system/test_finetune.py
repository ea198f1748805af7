"""Fine-tuning a pretrained timm backbone the way a user with few photos would: `train.pretrained` names a
weights file (made here: timm's tiny `test_resnet` trained on one synthetic task and saved as timm saves
weights), `dvc repro train` starts from exactly those weights, and on a small second task the fine-tuned
model beats the same backbone from scratch at the same budget. An offline hub request fails before
training."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.core import paths
from tests.support import make_project, run, set_param

pytestmark = pytest.mark.slow
BACKBONE = "test_resnet"  # timm's 0.4M-parameter ResNet made for tests: real architecture, CPU-cheap
SIDE = 32


def _stripes(angle: float, rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """RGB stripes at `angle` with a random frequency, phase and tint, plus noise: (h, w, 3) uint8."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    along = xx * np.cos(angle) + yy * np.sin(angle)
    wave = np.sin(2 * np.pi * rng.uniform(3, 6) * along + rng.uniform(0, 6))
    tint = rng.uniform(0.3, 1.0, 3)
    pixels = 127 + 100 * wave[..., None] * tint + rng.normal(0, 20, (h, w, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8)


def _pretrain(path, seed: int = 0) -> None:
    """The 'published' weights: test_resnet fitted to 8 stripe orientations, saved as a plain state dict."""
    import timm

    from pipeline.training.backbones import pretrained_config

    rng = np.random.default_rng(seed)
    angles = np.arange(8) * np.pi / 8
    y = np.repeat(np.arange(8), 80)
    x = np.stack([_stripes(angles[k], rng, (SIDE, SIDE)) for k in y])
    expects = pretrained_config(BACKBONE)
    mean, std = (torch.tensor(expects[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    inputs = (torch.tensor(x).permute(0, 3, 1, 2).float() / 255 - mean) / std
    torch.manual_seed(seed)
    net = timm.create_model(BACKBONE, num_classes=8)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    for _ in range(6):
        for idx in torch.randperm(len(y)).split(64):
            loss = torch.nn.functional.cross_entropy(net(inputs[idx]), torch.tensor(y[idx]))
            opt.zero_grad()
            loss.backward()
            opt.step()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)


def _write_task(root, per_class: dict[str, int], seed: int) -> None:
    """The user's small task: 4 of those orientations, mixed-size JPEGs, train and val folders."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in per_class.items():
        for k in range(4):
            folder = root / split / f"angle{k * 2}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                size = (int(rng.integers(40, 90)), int(rng.integers(40, 90)))
                image = Image.fromarray(_stripes(k * 2 * np.pi / 8, rng, size))
                image.save(folder / f"{i:03d}.jpg", quality=92)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    project = make_project(tmp_path_factory.mktemp("finetune") / "project")
    _pretrain(project / "weights" / "backbone.pth")
    _write_task(project / "data" / "raw", {"train": 6, "val": 30, "test": 30}, seed=1)
    for key, value in {
        "data.source": "imagefolder",
        "data.image_size": [SIDE, SIDE],
        "data.channels": 3,
        "train.backbone": BACKBONE,
        "train.pretrained": "weights/backbone.pth",
        "train.epochs": 6,
        "train.batch_size": 8,
        "train.lr": 0.003,
        "train.freeze_epochs": 1,
        "train.early_stopping": 0,
    }.items():
        set_param(project, key, value)
    return project


def _train(project, **env: str) -> dict:
    run(["dvc", "repro", "train"], cwd=project, **env)
    return json.loads((project / paths.TRAIN_REPORT).read_text())


def test_image_size_and_interpolation_backbone_resize_as_the_weights_were_trained(tmp_path):
    from pipeline.data.prepared import read_manifest
    from pipeline.training.backbones import pretrained_config

    project = make_project(tmp_path / "project")
    _write_task(project / "data" / "raw", {"train": 3, "val": 3, "test": 3}, seed=2)
    for key, value in {"data.source": "imagefolder", "data.image_size": "backbone", "data.channels": 3,
                       "data.interpolation": "backbone", "train.backbone": BACKBONE}.items():  # fmt: skip
        set_param(project, key, value)
    out = run(["tollgate", "prepare"], cwd=project)
    expects = pretrained_config(BACKBONE)  # 160x160, bilinear: not the 32x32 of the other tests
    manifest = read_manifest(project / paths.PREPARED_DIR)
    assert manifest["image_shape"] == [*expects["input_size"], 3]
    assert manifest["interpolation"] == expects["interpolation"]
    assert f"as {BACKBONE}'s weights expect" in out.stdout + out.stderr
    set_param(project, "train.backbone", "small_cnn")  # trained from scratch: no size to take
    refused = run(["tollgate", "prepare"], cwd=project, check=False)
    said = refused.stdout + refused.stderr
    assert refused.returncode != 0 and "data.image_size and data.interpolation: backbone" in said, said
    assert read_manifest(project / paths.PREPARED_DIR) == manifest  # the prepared data was not touched


def test_training_starts_from_exactly_the_weights_file(project):
    from pipeline.core.config import load_params
    from pipeline.data.prepared import read_manifest
    from pipeline.training import backbones
    from pipeline.training.model import build, make_meta

    run(["dvc", "repro", "validate"], cwd=project)
    t = load_params(project / "params.yaml").train
    weights = backbones.resolve(t.backbone, t.pretrained, t.download_weights, project)
    meta = make_meta(t.backbone, t.width, read_manifest(project / paths.PREPARED_DIR), weights)
    start = build(meta, weights).net.state_dict()
    saved = torch.load(project / "weights" / "backbone.pth", weights_only=True)
    head = {"fc.weight", "fc.bias"}  # a new head: 4 classes here, 8 in the file
    assert set(saved) - head == set(start) - head
    for key in set(saved) - head:
        assert torch.equal(start[key], saved[key]), key
    assert start["fc.weight"].shape[0] == 4
    # the model normalises as the backbone's weights expect, and says where its weights came from
    assert meta["normalization"]["mean"] == backbones.pretrained_config(BACKBONE)["mean"]
    assert meta["pretrained"]["source"] == "file" and len(meta["pretrained"]["sha256"]) == 64


def test_fine_tuning_beats_the_same_backbone_from_scratch_at_the_same_budget(project):
    tuned = _train(project)
    saved = json.loads((project / paths.MODEL_DIR / "model.json").read_text())
    assert saved["backbone"] == BACKBONE and saved["pretrained"]["weights"] == "weights/backbone.pth"
    set_param(project, "train.pretrained", "none")
    scratch = _train(project)
    print(f"val accuracy: fine-tuned {tuned['val_accuracy']:.3f}, from scratch {scratch['val_accuracy']:.3f}")
    assert tuned["val_accuracy"] >= scratch["val_accuracy"] + 0.15
    assert tuned["val_accuracy"] >= 0.8


def test_an_offline_hub_request_without_cached_weights_fails_before_training(project, tmp_path):
    set_param(project, "train.pretrained", "hub")
    set_param(project, "train.download_weights", False)
    (project / paths.TRAIN_REPORT).unlink(missing_ok=True)
    empty = str(tmp_path / "caches")
    out = run(["dvc", "repro", "train"], cwd=project, check=False, HF_HOME=empty, TORCH_HOME=empty)
    said = out.stdout + out.stderr
    assert out.returncode != 0
    assert "train.download_weights is false" in said and empty in said, said
    assert "timm/test_resnet" in said  # which weights it looked for
    assert "epoch 1/" not in said and not (project / paths.TRAIN_REPORT).exists()


def test_a_fine_tuned_backbone_streams_through_the_whole_pipeline_and_serves_full_size_jpegs(project):
    import csv

    from pipeline.data.prepared import FILES, load_split
    from pipeline.training.model import load, predict_proba
    from tests.support import Server, http, model_client

    set_param(project, "train.pretrained", "weights/backbone.pth")
    set_param(project, "train.in_memory_mb", 0)  # every split streams from its memory map
    # 18 steps on 24 images: accurate (0.9 here), not yet calibrated or even across classes; the gate's
    # strictness is tested elsewhere, this is about a timm model going all the way
    set_param(project, "gate.warn_only", ["max_p99_latency_ms", "max_ece", "min_class_recall"])
    out = run(["dvc", "repro"], cwd=project).stdout
    assert "registered tollgate-classifier v1" in out, out
    version = model_client(project).get_model_version("tollgate-classifier", "1")
    card = version.description  # the model card: what a person reads in the registry
    assert "`test_resnet`, fine-tuned from file weights `weights/backbone.pth`" in card
    assert "| angle0 | 6 | 30 | 30 |" in card  # images per class and split
    assert "**Most confused pairs**" in card and "## Limitations" in card
    client = model_client(project)
    logged = {a.path for a in client.list_artifacts(version.run_id, "evaluation")}
    assert {"evaluation/model_card.md", "evaluation/mistakes.png"} <= logged
    _looks_like_a_grid_of_mistakes(project / paths.MISTAKES)
    assert any(r.startswith("timm==") for r in _requirements(project, version))

    with open(project / paths.PREPARED_DIR / FILES) as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "test"][:8]
    test = load_split(project / paths.PREPARED_DIR, "test")
    model, _ = load(project / paths.MODEL_DIR)
    server = Server(project)
    try:
        for row in rows:
            jpeg = (project / "data" / "raw" / row["path"]).read_bytes()  # 40-90 px, resized by the server
            status, body = http("POST", server.url + "/predict", jpeg, {"Content-Type": "image/jpeg"})
            assert status == 200, body
            evaluated = predict_proba(model, test.x[int(row["index"]) : int(row["index"]) + 1]).argmax(1)
            assert body["predictions"][0]["class"] == f"angle{int(evaluated.item()) * 2}", row["path"]
    finally:
        server.stop()


def _looks_like_a_grid_of_mistakes(png) -> None:
    """What a person would see: a white sheet with a title and, per mistake, the photo and a coloured map."""
    from PIL import Image

    with Image.open(png) as img:
        assert img.format == "PNG"
        pixels = np.asarray(img.convert("RGB")).astype(int)
    assert pixels.shape[1] >= 600 and pixels.shape[0] >= 150
    assert (pixels[:5] == 255).all()  # a white margin above the title
    saturation = pixels.max(axis=2) - pixels.min(axis=2)
    assert (saturation > 100).mean() > 0.02  # the heat maps' colours (the stripes' tints are paler)


def _requirements(project, version) -> list[str]:
    from mlflow.artifacts import download_artifacts

    from tests.support import model_client

    where = model_client(project).get_model_version_download_uri(version.name, version.version)
    folder = download_artifacts(where, tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    return (Path(folder) / "requirements.txt").read_text().split()
