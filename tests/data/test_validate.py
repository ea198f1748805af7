"""The validation suite on real prepared arrays, broken the way real data breaks."""

import shutil

import numpy as np
import pytest

from pipeline.data.expectations import run_suite
from tests.support import ROOT, config, run


@pytest.fixture
def prepared(prepared_digits, tmp_path):
    out = tmp_path / "data" / "prepared"
    shutil.copytree(prepared_digits, out)
    return out


def _edit(prepared, split, fn):
    x = np.load(prepared / f"{split}_x.npy")
    y = np.load(prepared / f"{split}_y.npy")
    x, y = fn(x, y)
    np.save(prepared / f"{split}_x.npy", x)
    np.save(prepared / f"{split}_y.npy", y)


def test_clean_data_passes_every_expectation(prepared):
    report = run_suite(prepared, config("validate"))
    assert report["passed"], report["failures"]
    assert len(report["checks"]) >= 20
    assert report["counts"]["test"]["7"] > 0


def test_a_class_missing_from_a_split_is_named(prepared):
    _edit(prepared, "test", lambda x, y: (x[y != 7], y[y != 7]))
    report = run_suite(prepared, config("validate"))
    assert not report["passed"]
    assert any("class 7 has 0 in test" in f for f in report["failures"])


def test_images_shared_between_train_and_test_are_leakage(prepared):
    train_x = np.load(prepared / "train_x.npy")
    _edit(prepared, "test", lambda x, y: (np.concatenate([x[:-3], train_x[:3]]), y))
    report = run_suite(prepared, config("validate"))
    assert report["failures"] == [
        next(
            f
            for f in report["failures"]
            if f.startswith("test: no images shared with train or val: 3 images also in an earlier")
        )
    ]


def test_an_empty_split_fails_with_every_class_named(prepared):
    _edit(prepared, "test", lambda x, y: (x[:0], y[:0]))
    failures = run_suite(prepared, config("validate"))["failures"]
    assert "test: at least 1 images: 0 images, fewer than 1: the dataset is empty or tiny" in failures
    assert any("class 0 has 0 in test" in f and "class 9 has 0 in test" in f for f in failures)


def test_labels_outside_the_class_list_fail(prepared):
    _edit(prepared, "val", lambda x, y: (x, np.where(np.arange(len(y)) == 0, 12, y)))
    report = run_suite(prepared, config("validate"))
    assert any(
        f.startswith("val: labels in class list: 1 labels outside the class list (12)")
        for f in report["failures"]
    )


def test_wrong_dtype_and_shape_fail(prepared):
    _edit(prepared, "train", lambda x, y: (np.pad(x, ((0, 0), (0, 1), (0, 0), (0, 0))).astype(np.float32), y))
    failures = run_suite(prepared, config("validate"))["failures"]
    assert any(f.startswith("train: dtype is uint8") for f in failures)
    assert any(f.startswith("train: image height") for f in failures)


def test_pixel_range_is_enforced(prepared):
    report = run_suite(prepared, config("validate", pixel_max=200))
    assert any(f.startswith("train: pixel range (max)") for f in report["failures"])


def test_validate_stage_exits_nonzero_and_names_the_fault(prepared):
    _edit(prepared, "val", lambda x, y: (x[y != 3], y[y != 3]))
    project = prepared.parent.parent
    shutil.copy(ROOT / "params.yaml", project / "params.yaml")
    proc = run(["tollgate", "validate"], cwd=project, check=False)
    assert proc.returncode == 1
    assert "data validation failed" in proc.stderr and "class 3 has 0 in val" in proc.stderr
    assert (project / "reports" / "validation.json").exists()
