"""Behavioural tests of the network, the training loop and the gate, on the real digits data."""

import numpy as np
import pytest
import torch

from pipeline.data.prepared import Dataset, load_split, read_manifest
from pipeline.evaluation import gate as gating
from pipeline.evaluation.champion import Champion
from pipeline.evaluation.metrics import (
    classification_metrics,
    expected_calibration_error,
    shifted,
    top_k_accuracy,
)
from pipeline.evaluation.verdict import Verdict
from pipeline.training import model as model_io
from pipeline.training.loop import pick_device, train
from tests.support import config


@pytest.fixture(scope="module")
def trained(prepared_digits):
    meta = model_io.make_meta("small_cnn", 16, read_manifest(prepared_digits))
    cfg = config("train", width=16, epochs=3, threads=1)
    result = train(cfg, 0, load_split(prepared_digits, "train"), load_split(prepared_digits, "val"), meta)
    return result, meta


def test_loss_goes_down_on_a_small_real_batch(prepared_digits):
    part = load_split(prepared_digits, "train")
    batch = Dataset(np.asarray(part.x[:64]), part.y[:64], part.classes)
    meta = model_io.make_meta("small_cnn", 8, read_manifest(prepared_digits))
    result = train(config("train", width=8, epochs=30, batch_size=64, lr=0.01), 0, batch, batch, meta)
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
        config("train", width=16, epochs=3, threads=1),
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
        config("train", width=8, epochs=0),
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


CFG = config("gate", min_accuracy=0.9, min_macro_f1=0.9, max_drop=0.01, warn_only=["max_p99_latency_ms"])
CLASSES = ["a", "b"]


def gate(candidate, classes, cfg, champion, correct=None) -> dict:
    """The verdict as the evaluate stage writes it to reports/gate.json."""
    return gating.gate(candidate, classes, cfg, champion, correct).model_dump(mode="json", by_alias=True)


def gate_markdown(verdict: dict) -> str:
    return Verdict.model_validate(verdict).markdown()


def _candidate(**changes):
    good = {
        "accuracy": 0.95,
        "macro_f1": 0.94,
        "per_class_recall": {"a": 0.97, "b": 0.93},
        "ece": 0.03,
        "latency_p99_ms": 2.0,
        "model_mb": 0.4,
        "shift_stability": 0.9,
    }
    return {**good, **changes}


def test_gate_without_champion_passes_on_absolute_bounds_and_says_so():
    verdict = gate(_candidate(), CLASSES, CFG, None)
    assert verdict["passed"] and verdict["reasons"] == [] and verdict["warnings"] == []
    assert "no @champion yet" in verdict["checks"][-1]["detail"]


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"accuracy": 0.81}, "accuracy 0.8100 < 0.9000"),
        ({"macro_f1": 0.5}, "macro_f1 0.5000 < 0.9000"),
        ({"per_class_recall": {"a": 0.99, "b": 0.4}}, "min class recall 0.4000 < 0.8000"),
        ({"ece": 0.3}, "ece 0.3000 > 0.1000"),
        ({"model_mb": 80.0}, "model size MB 80.0000 > 50.0000"),
        ({"shift_stability": 0.2}, "shift stability 0.2000 < 0.5000"),
    ],
)
def test_gate_blocks_each_absolute_bound_with_the_reason(changes, reason):
    verdict = gate(_candidate(**changes), CLASSES, CFG, None)
    assert not verdict["passed"]
    assert verdict["reasons"] == [reason]


def test_a_warn_only_check_reports_without_blocking():
    verdict = gate(_candidate(latency_p99_ms=120.0), CLASSES, CFG, None)
    assert verdict["passed"]
    assert verdict["warnings"] == ["p99 latency ms 120.0000 > 50.0000"]
    blocking = gate(_candidate(latency_p99_ms=120.0), CLASSES, CFG.model_copy(update={"warn_only": []}), None)
    assert blocking["reasons"] == ["p99 latency ms 120.0000 > 50.0000"]


def test_gate_blocks_a_regression_against_the_rescored_champion():
    champion = Champion("3", CLASSES, {"accuracy": 0.97, "macro_f1": 0.95})
    verdict = gate(_candidate(accuracy=0.955), CLASSES, CFG, champion)
    assert verdict["reasons"] == ["accuracy vs champion v3 0.9550 < 0.9600"]
    assert gate(_candidate(accuracy=0.961), CLASSES, CFG, champion)["passed"]


def test_relative_drop_scales_with_the_champion():
    champion = Champion("1", CLASSES, {"accuracy": 0.96, "macro_f1": 0.94})
    relative = CFG.model_copy(update={"drop_mode": "relative", "max_drop": 0.05})
    floor = next(
        c for c in gate(_candidate(), CLASSES, relative, champion)["checks"] if "accuracy vs" in c["check"]
    )
    assert floor["threshold"] == pytest.approx(0.96 * 0.95)


def test_gate_blocks_when_classes_differ_from_the_champion():
    champion = Champion("2", ["a", "c"], None)
    verdict = gate(_candidate(accuracy=0.99), CLASSES, CFG, champion)
    assert not verdict["passed"]
    assert "other classes" in verdict["reasons"][0]


def _paired(worse: int, better: int, n: int = 359):
    """A champion right on every image but `better`, a candidate wrong on `worse` of those it gets."""
    champion_right = np.ones(n, dtype=bool)
    champion_right[:better] = False
    candidate_right = ~champion_right.copy()
    candidate_right[better:] = True
    candidate_right[better : better + worse] = False
    metrics = {"accuracy": champion_right.mean(), "macro_f1": champion_right.mean()}
    champion = Champion("4", CLASSES, metrics, correct=champion_right)
    return champion, candidate_right


def test_a_significantly_worse_candidate_is_refused_whatever_max_drop():
    champion, correct = _paired(worse=6, better=0)
    generous = CFG.model_copy(update={"max_drop": 0.5})
    accuracy = float(correct.mean())
    verdict = gate(_candidate(accuracy=accuracy, macro_f1=accuracy), CLASSES, generous, champion, correct)
    assert not verdict["passed"]
    (row,) = [c for c in verdict["checks"] if c["check"] == "paired vs champion v4"]
    assert row["value"] == pytest.approx(0.5**6) and row["threshold"] == 0.05 and not row["pass"]
    assert "worse on 6 images, better on 0 of 359: significantly worse" in row["detail"]
    assert verdict["paired"] == {
        "champion": "4", "better": 0, "worse": 6, "images": 359, "p_value": round(0.5**6, 6),
        "significance": 0.05, "max_drop": 0.5,
    }  # fmt: skip
    assert any(r.startswith("paired vs champion v4") for r in verdict["reasons"])


def test_a_drop_within_noise_is_allowed_by_max_drop_and_says_so():
    champion, correct = _paired(worse=3, better=0)
    accuracy = float(correct.mean())
    verdict = gate(_candidate(accuracy=accuracy, macro_f1=accuracy), CLASSES, CFG, champion, correct)
    assert verdict["passed"], verdict["reasons"]
    (row,) = [c for c in verdict["checks"] if c["check"] == "paired vs champion v4"]
    within = "worse on 3 images, better on 0 of 359: a drop within noise (p = 0.125)"
    assert row["detail"] == within + ": allowed by gate.max_drop 0.01"
    champion, correct = _paired(worse=2, better=9)
    verdict = gate(_candidate(accuracy=0.99, macro_f1=0.99), CLASSES, CFG, champion, correct)
    assert verdict["paired"]["better"] == 9 and verdict["paired"]["p_value"] > 0.9 and verdict["passed"]


def test_the_paired_p_value_is_scipys_one_sided_exact_binomial_test():
    from scipy.stats import binomtest

    from pipeline.evaluation.gate import paired

    for worse, better in [(1, 0), (6, 0), (3, 2), (12, 30), (40, 25), (150, 149)]:
        champion, correct = _paired(worse=worse, better=better, n=400)
        expected = binomtest(better, better + worse, 0.5, alternative="less").pvalue
        assert paired(correct, champion, CFG).p_value == pytest.approx(expected, abs=1e-6), (worse, better)


def test_gate_markdown_has_one_row_per_check():
    verdict = gate(_candidate(accuracy=0.5), CLASSES, CFG, None)
    md = gate_markdown(verdict)
    assert md.startswith("## Gate: FAILED")
    assert len([line for line in md.splitlines() if line.startswith("| ")]) == 1 + len(verdict["checks"])
    assert "| accuracy | 0.5000 | 0.9000 | **FAIL** | block |" in md


def test_top_k_and_calibration_error_on_known_cases():
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.5, 0.4, 0.1]])
    y = np.array([0, 1, 2])
    assert top_k_accuracy(probs, y, 1) == pytest.approx(1 / 3)
    assert top_k_accuracy(probs, y, 2) == pytest.approx(2 / 3)
    # one bin: mean confidence 0.6, accuracy 1/3
    assert expected_calibration_error(probs, y, 1) == pytest.approx(abs(1 / 3 - 0.6))


def test_shift_moves_pixels_and_fills_with_zeros():
    x = np.arange(9, dtype=np.uint8).reshape(1, 3, 3, 1) + 1
    down = shifted(x, 1, 0)[0, ..., 0]
    assert down.tolist() == [[0, 0, 0], [1, 2, 3], [4, 5, 6]]
    assert shifted(x, 0, -1)[0, ..., 0].tolist() == [[2, 3, 0], [5, 6, 0], [8, 9, 0]]


def test_metrics_match_a_hand_computed_case():
    y_true = np.array([0, 0, 1, 1, 1, 2])
    y_pred = np.array([0, 1, 1, 1, 0, 2])
    m = classification_metrics(y_true, y_pred, ["x", "y", "z"])
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["per_class_recall"] == pytest.approx({"x": 0.5, "y": 2 / 3, "z": 1.0})
    f1_x, f1_y, f1_z = 0.5, 2 / 3, 1.0  # precision equals recall for x and y here
    assert m["macro_f1"] == pytest.approx((f1_x + f1_y + f1_z) / 3)
