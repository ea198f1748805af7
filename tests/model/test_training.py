"""The training loop's options on the real digits: each must change what it claims and nothing else."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from pipeline.data.prepared import load_split, read_manifest
from pipeline.training import model as model_io
from pipeline.training.loop import augment, train
from tests.support import config


@pytest.fixture(scope="module")
def splits(prepared_digits):
    return load_split(prepared_digits, "train"), load_split(prepared_digits, "val")


def _fit(prepared_digits, splits, backbone="small_cnn", **cfg):
    meta = model_io.make_meta(backbone, 8, read_manifest(prepared_digits))
    options = {"width": 8, "epochs": 3, "threads": 1, **cfg}
    return train(config("train", backbone=backbone, **options), 0, *splits, meta)


def test_streaming_from_disk_trains_the_same_model_as_in_memory(prepared_digits, splits):
    in_memory = _fit(prepared_digits, splits)
    streamed = _fit(prepared_digits, splits, in_memory_mb=0, loader_workers=1)
    for a, b in zip(in_memory.model.state_dict().values(), streamed.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_a_gpu_less_machine_never_calls_cuda_only_apis(prepared_digits, splits, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")

    def cuda_only(*args, **kwargs):
        raise AssertionError("a CUDA-only API was called on a machine without a GPU")

    for name in ("set_device", "synchronize", "current_device", "get_device_name", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, cuda_only)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = _fit(prepared_digits, splits, epochs=1, precision="auto", channels_last="auto")
    assert result.device == "cpu"
    assert not torch.backends.cudnn.benchmark


def test_gpu_speed_paths_run_on_cpu_bf16_channels_last_compile(prepared_digits, splits):
    result = _fit(
        prepared_digits, splits, epochs=2, precision="bf16", channels_last="on", compile=True, lr=0.01
    )
    assert result.history[-1]["val_accuracy"] > 0.5
    assert result.model.net.features[0][0].weight.is_contiguous(memory_format=torch.channels_last)


def test_resnet18_adapted_to_small_images_learns_and_round_trips(prepared_digits, splits, tmp_path):
    result = _fit(prepared_digits, splits, backbone="resnet18", epochs=3, batch_size=64, threads=2)
    assert result.history[-1]["val_accuracy"] > 0.7
    assert isinstance(result.model.net.maxpool, torch.nn.Identity)
    meta = model_io.make_meta("resnet18", 8, read_manifest(prepared_digits))
    model_io.save(result.model, meta, tmp_path)
    loaded, _ = model_io.load(tmp_path)
    x = np.asarray(splits[1].x[:32])
    assert torch.equal(model_io.predict_proba(loaded, x), model_io.predict_proba(result.model, x))


def test_sgd_nesterov_with_cosine_schedule_learns_and_anneals(prepared_digits, splits):
    result = _fit(prepared_digits, splits, optimizer="sgd", schedule="cosine", lr=0.05, epochs=4)
    assert result.history[-1]["val_accuracy"] > 0.9
    lrs = [row["lr"] for row in result.history]
    assert lrs[0] > lrs[-1] and lrs[-1] < 0.01 * 0.05 + 1e-9


def test_early_stopping_stops_and_keeps_the_best_epoch(prepared_digits, splits):
    # A learning rate that diverges after the first epochs: val loss stops improving quickly.
    result = _fit(prepared_digits, splits, epochs=30, early_stopping=2, lr=0.3, schedule="cosine", warmup=0.0)
    assert len(result.history) < 30
    best = min(result.history, key=lambda r: r["val_loss"])
    assert result.best_epoch == best["epoch"] and len(result.history) == best["epoch"] + 2


def test_augmentation_shifts_and_flips_whole_batches_on_the_device():
    x = torch.arange(2 * 4 * 4, dtype=torch.uint8).reshape(2, 4, 4, 1) + 1
    gen = torch.Generator().manual_seed(0)
    shifted = augment(x, config("train", shift_pixels=1), gen)
    assert shifted.shape == x.shape and shifted.dtype == torch.uint8
    for img, out in zip(x, shifted, strict=True):  # a translation: every kept pixel appears in the source
        kept = out[out > 0]
        assert set(kept.tolist()) <= set(img.flatten().tolist()) and len(kept) >= 9
    flipped = augment(x.repeat(32, 1, 1, 1), config("train", flip=True), gen)
    n_flipped = sum(torch.equal(f, x[i % 2].flip(1)) for i, f in enumerate(flipped))
    assert 8 < n_flipped < 56
    assert torch.equal(augment(x, config("train"), gen), x)


def test_a_pretrained_backbone_stays_frozen_while_its_new_head_warms_up(
    prepared_digits, splits, tmp_path
):
    import timm

    from pipeline.training import backbones

    file = tmp_path / "weights.pth"
    torch.manual_seed(1)
    torch.save(timm.create_model("test_resnet", num_classes=5).state_dict(), file)
    weights = backbones.resolve("test_resnet", str(file), False, tmp_path)
    manifest = read_manifest(prepared_digits)
    meta = model_io.make_meta("test_resnet", 8, manifest, weights)
    start = model_io.build(meta, weights).state_dict()
    head = {"net.fc.weight", "net.fc.bias"}
    options = {"backbone": "test_resnet", "pretrained": str(file), "threads": 1, "freeze_epochs": 1}

    def moved(result) -> set[str]:
        named = dict(result.model.named_parameters())
        return {k for k, v in named.items() if not torch.equal(v.detach(), start[k])}

    warm = train(config("train", epochs=1, **options), 0, *splits, meta, weights=weights)
    assert moved(warm) == head  # only the head learned in the frozen epoch
    tuned = train(config("train", epochs=2, **options), 0, *splits, meta, weights=weights)
    assert moved(tuned) > head  # then the backbone learns too


def test_photo_augmentation_crops_and_jitters_each_image_within_the_pixel_range():
    x = torch.arange(4 * 16 * 16 * 3).reshape(4, 16, 16, 3).remainder(256).to(torch.uint8)
    off = augment(x, config("train", crop_scale=1.0, color_jitter=0.0), torch.Generator().manual_seed(0))
    assert torch.equal(off, x)  # both off: the batch is untouched
    on = augment(x, config("train", crop_scale=0.3, color_jitter=0.4), torch.Generator().manual_seed(0))
    assert on.shape == x.shape and on.dtype == torch.float32
    assert on.min() >= 0.0 and on.max() <= 255.0
    changed = [not torch.allclose(on[i], x[i].float()) for i in range(4)]
    assert all(changed)
    again = augment(x, config("train", crop_scale=0.3, color_jitter=0.4), torch.Generator().manual_seed(0))
    assert torch.equal(on, again)  # one seeded stream: a resumed run draws the same crops


def test_calibration_brings_a_smoothed_model_back_to_its_accuracy_and_keeps_every_prediction(
    prepared_digits, splits, tmp_path
):
    from pipeline.evaluation.metrics import expected_calibration_error

    test = load_split(prepared_digits, "test")
    raw = _fit(prepared_digits, splits, label_smoothing=0.3, epochs=6)
    calibrated = _fit(prepared_digits, splits, label_smoothing=0.3, epochs=6, calibrate=True)
    t = float(calibrated.model.temperature)
    assert float(raw.model.temperature) == 1.0 and t < 1.0  # smoothing made it under-confident: sharpen
    before, after = (model_io.predict_proba(r.model, test.x).numpy() for r in (raw, calibrated))
    assert (before.argmax(1) == after.argmax(1)).all()  # the same weights, the same classes
    assert expected_calibration_error(after, test.y, 15) < expected_calibration_error(before, test.y, 15) / 2
    meta = model_io.make_meta("small_cnn", 8, read_manifest(prepared_digits))
    model_io.save(calibrated.model, meta, tmp_path)
    reloaded, _ = model_io.load(tmp_path)
    assert float(reloaded.temperature) == pytest.approx(t)  # saved with the weights: every runtime divides


def test_auto_waits_passively_once_the_load_leaves_fewer_free_cores_than_torch_threads():
    from pipeline.training.waits import choose

    assert choose("auto", threads=2, cores=2, load=0.3) is None  # a stage before it: still 2 free cores
    assert choose("auto", threads=2, cores=2, load=0.6) == "PASSIVE"
    assert choose("auto", threads=1, cores=2, load=0.9) is None
    assert choose("auto", threads=8, cores=16, load=6.0) is None
    assert choose("auto", threads=16, cores=16, load=2.0) == "PASSIVE"
    assert choose("spin", threads=2, cores=2, load=9.0) is None
    assert choose("passive", threads=1, cores=16, load=0.0) == "PASSIVE"


def test_the_wait_policy_is_set_before_torch_loads_openmp_takes_it_and_the_weights_do_not_change(
    prepared_digits,
):
    """Each policy in a fresh process, as the stage runs: OpenMP's own report (OMP_DISPLAY_ENV) once torch
    has loaded gives the spin count (0 is passive, 300000 its default), and two threads trained under
    either give the same weights to the bit: how idle threads wait is not arithmetic."""
    import subprocess
    import sys

    from pipeline.training import waits
    from tests.support import ROOT

    child = f"""
import hashlib, sys
from pipeline.training import waits
print(waits.apply(sys.argv[1], 2, 1))
from pipeline.data.prepared import load_split, read_manifest
from pipeline.training import model as model_io
from pipeline.training.loop import train
from tests.support import config
p = {str(prepared_digits)!r}
meta = model_io.make_meta("small_cnn", 8, read_manifest(p))
splits = load_split(p, "train"), load_split(p, "val")
r = train(config("train", width=8, epochs=2, threads=2), 0, *splits, meta)
print(hashlib.sha256(b"".join(t.numpy().tobytes() for t in r.model.state_dict().values())).hexdigest())
"""
    env = {k: v for k, v in os.environ.items() if k != waits.ENV} | {"OMP_DISPLAY_ENV": "VERBOSE"}
    weights = {}
    for policy, spin_count, said in [("passive", "0", "torch threads wait passively"),
                                     ("spin", "300000", "torch threads spin")]:  # fmt: skip
        proc = subprocess.run([sys.executable, "-c", child, policy], cwd=ROOT, env=env, capture_output=True,
                              text=True, check=True)  # fmt: skip
        assert f"GOMP_SPINCOUNT = '{spin_count}'" in proc.stderr
        told, digest = proc.stdout.splitlines()[0], proc.stdout.splitlines()[-1]
        assert told.startswith(said)
        weights[policy] = digest
    assert weights["passive"] == weights["spin"]


def test_an_omp_wait_policy_in_the_environment_wins_and_a_late_call_says_it_is_late():
    import subprocess
    import sys

    child = "from pipeline.training import waits; print(waits.apply('passive', 2, 1)); import torch"
    env = dict(os.environ, OMP_WAIT_POLICY="ACTIVE", OMP_DISPLAY_ENV="VERBOSE")
    proc = subprocess.run([sys.executable, "-c", child], env=env, capture_output=True, text=True, check=True)
    assert "GOMP_SPINCOUNT = '30000000000'" in proc.stderr  # ACTIVE, as the user said
    assert "OMP_WAIT_POLICY=ACTIVE says (set in the environment)" in proc.stdout
    from pipeline.training import waits  # this process has torch already

    before = os.environ.get(waits.ENV)
    os.environ.pop(waits.ENV, None)
    try:
        assert "torch was loaded before" in waits.apply("passive", 2, 1)
        assert waits.ENV not in os.environ
    finally:
        if before is not None:
            os.environ[waits.ENV] = before
