"""Behavioural tests of the network, the training loop and the gate, on the real digits data."""

import numpy as np
import pytest
import torch

from pipeline import model as model_io
from pipeline.config import EvaluateConfig, TrainConfig
from pipeline.data import Dataset, load_split, read_manifest
from pipeline.evaluate import classification_metrics, gate
from pipeline.train import pick_device, train


@pytest.fixture(scope="module")
def trained(prepared_digits):
    meta = model_io.make_meta("small_cnn", 16, read_manifest(prepared_digits))
    cfg = TrainConfig(width=16, epochs=3, threads=1)
    result = train(cfg, 0, load_split(prepared_digits, "train"), load_split(prepared_digits, "val"), meta)
    return result, meta


def test_loss_goes_down_on_a_small_real_batch(prepared_digits):
    part = load_split(prepared_digits, "train")
    batch = Dataset(np.asarray(part.x[:64]), part.y[:64], part.classes)
    meta = model_io.make_meta("small_cnn", 8, read_manifest(prepared_digits))
    result = train(TrainConfig(width=8, epochs=30, batch_size=64, lr=0.01), 0, batch, batch, meta)
    losses = [row["train_loss"] for row in result.history]
    assert losses[-1] < 0.5 * losses[0]
    assert result.history[-1]["train_accuracy"] > 0.8


def test_training_learns_digits(trained, prepared_digits):
    result, _ = trained
    test = load_split(prepared_digits, "test")
    pred = model_io.predict_proba(result.model, test.x).argmax(1).numpy()
    assert classification_metrics(test.y, pred, test.classes)["accuracy"] > 0.85
    assert result.device == "cpu"


def test_seeded_training_is_reproducible(prepared_digits, trained):
    result, meta = trained
    again = train(
        TrainConfig(width=16, epochs=3, threads=1),
        0,
        load_split(prepared_digits, "train"),
        load_split(prepared_digits, "val"),
        meta,
    )
    for a, b in zip(result.model.state_dict().values(), again.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_saved_model_reloads_without_pickle_and_predicts_identically(trained, prepared_digits, tmp_path):
    result, meta = trained
    model_io.save(result.model, meta, tmp_path)
    loaded, loaded_meta = model_io.load(tmp_path)
    test = load_split(prepared_digits, "test")
    assert loaded_meta == meta
    assert torch.equal(model_io.predict_proba(loaded, test.x), model_io.predict_proba(result.model, test.x))
    # weights_only loading refuses anything but tensors: the file holds no code
    state = torch.load(tmp_path / model_io.WEIGHTS, weights_only=True)
    assert {"mean", "std"} <= {k.split(".")[-1] for k in state}


def test_zero_epochs_gives_an_untrained_model(prepared_digits):
    meta = model_io.make_meta("small_cnn", 8, read_manifest(prepared_digits))
    result = train(
        TrainConfig(width=8, epochs=0),
        0,
        load_split(prepared_digits, "train"),
        load_split(prepared_digits, "val"),
        meta,
    )
    assert result.history == []


def test_cpu_machine_never_picks_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert pick_device("auto").type in ("cpu", "mps")


CFG = EvaluateConfig(min_accuracy=0.9, min_macro_f1=0.9, max_drop=0.01)
CLASSES = ["a", "b"]


def test_gate_without_champion_passes_on_absolute_bounds_and_says_so():
    verdict = gate({"accuracy": 0.95, "macro_f1": 0.94}, CLASSES, CFG, None)
    assert verdict["passed"]
    assert "no @champion yet" in verdict["checks"][-1]["detail"]


def test_gate_blocks_below_absolute_bounds_with_the_reason():
    verdict = gate({"accuracy": 0.81, "macro_f1": 0.95}, CLASSES, CFG, None)
    assert not verdict["passed"]
    assert verdict["reasons"] == ["accuracy 0.8100 < 0.9000"]


def test_gate_blocks_a_regression_against_the_rescored_champion():
    champion = {"version": "3", "classes": CLASSES, "metrics": {"accuracy": 0.97, "macro_f1": 0.96}}
    verdict = gate({"accuracy": 0.955, "macro_f1": 0.958}, CLASSES, CFG, champion)
    assert verdict["reasons"] == ["accuracy vs champion v3 0.9550 < 0.9600"]
    assert gate({"accuracy": 0.961, "macro_f1": 0.958}, CLASSES, CFG, champion)["passed"]


def test_gate_blocks_when_classes_differ_from_the_champion():
    champion = {"version": "2", "classes": ["a", "c"], "metrics": None}
    verdict = gate({"accuracy": 0.99, "macro_f1": 0.99}, CLASSES, CFG, champion)
    assert not verdict["passed"]
    assert "other classes" in verdict["reasons"][0]


def test_metrics_match_a_hand_computed_case():
    y_true = np.array([0, 0, 1, 1, 1, 2])
    y_pred = np.array([0, 1, 1, 1, 0, 2])
    m = classification_metrics(y_true, y_pred, ["x", "y", "z"])
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["per_class_recall"] == pytest.approx({"x": 0.5, "y": 2 / 3, "z": 1.0})
    f1_x, f1_y, f1_z = 0.5, 2 / 3, 1.0  # precision equals recall for x and y here
    assert m["macro_f1"] == pytest.approx((f1_x + f1_y + f1_z) / 3)
