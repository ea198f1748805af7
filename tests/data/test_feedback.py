"""Feedback images as data: prepare adds them without moving the frozen splits, and validation judges them
like any other files."""

import numpy as np
import pytest

from pipeline.core.config import load_params
from pipeline.data import feedback, shards
from pipeline.data.prepared import load_split, prepare
from pipeline.data.sources import SourceError, load_digits
from tests.support import ROOT


def _feedback(path, n_per_class: int = 10, classes=("3", "7")) -> None:
    digits = load_digits()
    folder = shards.LocalFolder(path)
    for k, label in enumerate(classes):
        rows = np.flatnonzero(digits.y == (int(label) if label.isdigit() else k))[:n_per_class]
        for i, row in enumerate(rows):
            feedback.save_feedback(folder, label, f"req{label}x{i:03d}", 0, 255 - digits.x[row])


def _params(feedback: bool):
    params = load_params(ROOT / "params.yaml")
    data = params.data.model_copy(update={"use_feedback": feedback})
    return params.model_copy(update={"data": data})


def test_feedback_joins_train_and_its_newest_form_a_slice_while_the_frozen_splits_stay(tmp_path):
    _feedback(tmp_path / "feedback")
    params = _params(True)
    without = prepare(_params(False).data, params.seed, tmp_path / "without")
    with_fb = prepare(params.data, params.seed, tmp_path / "with", feedback_root=tmp_path / "feedback")
    assert with_fb["data_version"] != without["data_version"]
    assert with_fb["counts"]["feedback"]["3"] == 3 and with_fb["counts"]["feedback"]["7"] == 3  # 30 % of 10
    assert sum(with_fb["counts"]["train"].values()) == sum(without["counts"]["train"].values()) + 14
    for split in ("val", "test"):
        a, b = load_split(tmp_path / "without", split), load_split(tmp_path / "with", split)
        assert np.array_equal(a.x, b.x) and np.array_equal(a.y, b.y)
    # the newest labels are the held-out slice, each named by its request in the file table
    table = (tmp_path / "with" / "files.csv").read_text()
    for i in range(7, 10):
        assert f"data/feedback/req3x{i:03d}#0,3,feedback," in table


def test_malformed_feedback_is_refused_by_validation_naming_the_files(tmp_path):
    from pipeline.data.expectations import run_suite

    folder = tmp_path / "feedback"
    _feedback(folder)
    feedback.save_feedback(
        shards.LocalFolder(folder), "3", "blank", 0, np.zeros((8, 8, 1))
    )  # a blank "image"
    (folder / "notes.txt").write_text("not an image")
    (folder / "feedback-0000000000001-1-000001.npz").write_bytes(b"PK\x03\x04 truncated")
    params = _params(True)
    prepare(params.data, params.seed, tmp_path / "prepared", feedback_root=folder)
    report = run_suite(tmp_path / "prepared", params.validate_)
    assert not report["passed"]
    failures = "\n".join(report["failures"])
    assert "notes.txt (not a feedback shard)" in failures
    assert "feedback-0000000000001-1-000001.npz (unreadable" in failures
    assert "blank" in failures


def test_feedback_for_a_class_the_data_lacks_is_refused(tmp_path):
    _feedback(tmp_path / "feedback", classes=("3", "cat"))
    params = _params(True)
    with pytest.raises(SourceError, match="cat"):
        prepare(params.data, params.seed, tmp_path / "prepared", feedback_root=tmp_path / "feedback")


def test_a_relabel_replaces_only_that_inputs_label(tmp_path):
    x = np.full((8, 8, 1), 128)
    folder = shards.LocalFolder(tmp_path)
    feedback.save_feedback(folder, "3", "b-a", 0, x)
    feedback.save_feedback(folder, "3", "a", 0, x)
    feedback.save_feedback(folder, "5", "a", 0, x)  # request "a" relabelled: 3 -> 5
    assert feedback.feedback_labels(folder) == {("b-a", 0): "3", ("a", 0): "5"}


def test_concurrent_relabels_leave_one_label_per_input_and_few_files(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    folder = shards.LocalFolder(tmp_path)
    x = np.full((8, 8, 1), 128)
    jobs = [(f"input{i:02d}", label) for i in range(20) for label in "01234567"]  # 8 relabels per input
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda job: feedback.save_feedback(folder, job[1], job[0], 0, x), jobs))
    labels = feedback.feedback_labels(folder)
    assert sorted(labels) == [(f"input{i:02d}", 0) for i in range(20)]  # one label each
    assert len(shards.shard_names(folder, shards.FEEDBACK)) <= feedback.COMPACT_AT + 2
    assert len(feedback.feedback_rows(folder)["label"]) == 20
