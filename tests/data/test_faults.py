"""The twelve ways a user's data goes wrong, each made with real files in a temp folder and run through the
prepare and validate stages: the stage must fail and its message must name the fault and the culprits."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from pipeline import stages
from pipeline.core import paths
from pipeline.core.config import load_params, parse_params
from pipeline.core.files import load_json
from tests.support import ROOT, model_client, write_image, write_image_folder


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One MLflow store for the module: each validate run logs its report there."""
    return tmp_path_factory.mktemp("mlflow")


@pytest.fixture
def project(tmp_path, store, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store / 'mlflow.db'}")
    (tmp_path / "images").mkdir()
    return tmp_path


def _params(**overrides):
    raw = load_params(ROOT / "params.yaml").model_dump(mode="json", by_alias=True)
    raw["data"].update(source="imagefolder", root="images", image_size=[16, 16], channels=3)
    for dotted, value in overrides.items():
        section, key = dotted.split("__")
        raw[section][key] = value
    return parse_params(raw)


def _validate(project, **overrides) -> str:
    """Run prepare then validate; the validate stage's failure message (the test fails if it passes)."""
    params = _params(**overrides)
    stages.run("prepare", params, project)
    with pytest.raises(stages.StageFailed) as err:
        stages.run("validate", params, project)
    return str(err.value)


def test_a_clean_folder_passes_and_writes_json_and_data_docs(project):
    write_image_folder(project / "images")
    params = _params()
    stages.run("prepare", params, project)
    report = stages.run("validate", params, project)
    assert report["passed"] and not report["warnings"]
    ids = {c["id"] for c in report["checks"]}
    assert {"unreadable_files", "non_image_files", "leakage", "duplicates", "class_imbalance"} <= ids
    assert "channels" not in ids  # converted on purpose (data.channels: 3): mixed modes are fine
    index = (project / paths.DATA_DOCS / "index.html").read_text()
    assert "files" in index and "classes" in index
    assert load_json(project / paths.VALIDATION_REPORT) == report


def test_1_unreadable_and_truncated_images(project):
    root = write_image_folder(project / "images")
    png = root / "left" / "left_000.png"
    png.write_bytes(png.read_bytes()[:200])  # truncated mid-stream
    (root / "top" / "garbage.png").write_bytes(b"not a png at all")
    msg = _validate(project)
    assert "every image file decodes: 2 files" in msg
    assert "left/left_000.png (unreadable" in msg and "top/garbage.png (unreadable" in msg


def test_2_non_image_files_in_class_folders(project):
    root = write_image_folder(project / "images")
    (root / "ring" / "notes.txt").write_text("labelled by bob")
    msg = _validate(project)
    assert "only image files in class folders: 1 files: ring/notes.txt (not an image file (.txt))" in msg


def test_3_a_class_with_no_images_or_too_few(project):
    root = write_image_folder(project / "images")
    (root / "empty").mkdir()
    msg = _validate(project, validate__max_class_ratio=1000.0)
    assert "class empty has 0 in train" in msg and "class empty has 0 in test" in msg


def test_4_class_imbalance_beyond_the_ratio(project):
    root = write_image_folder(project / "images", per_class=30)
    for extra in sorted((root / "ring").iterdir())[8:]:
        extra.unlink()
    msg = _validate(project, validate__max_class_ratio=2.0)
    assert (
        "largest class at most 2x any other (train): class left has 20 training images; class ring only 5"
        in msg
    )


def test_5_identical_images_across_splits_are_leakage(project):
    root = project / "images"
    write_image_folder(root, split="train")
    write_image_folder(root, per_class=4, split="test", seed=1)
    shutil.copy(root / "train" / "top" / "top_003.png", root / "test" / "top" / "copied.png")
    msg = _validate(project)
    assert "test: no images shared with train or val: 1 images also in an earlier split" in msg
    assert "test/top/copied.png" in msg


def test_6_duplicates_within_a_split_above_the_fraction(project):
    root = write_image_folder(project / "images", per_class=30)
    for i in range(8):
        shutil.copy(root / "left" / "left_001.png", root / "left" / f"again_{i}.png")
    msg = _validate(project, validate__max_duplicate_fraction=0.02)
    assert "at most 2% duplicate images" in msg and "left/again_0.png" in msg


def test_7_inconsistent_channels_and_image_size_out_of_bounds(project):
    root = write_image_folder(project / "images")
    write_image(root / "top" / "tiny.png", "top", (4, 4), "L", 99)
    msg = _validate(project, data__channels=0)
    assert "every image has 1 channel(s)" in msg and "left/left_000.png" in msg  # RGB among grayscale
    assert "image width within bounds: 1 rows with unexpected width (4): top/tiny.png" in msg


def test_8_constant_blank_images(project):
    root = write_image_folder(project / "images")
    Image.new("L", (32, 32), 0).save(root / "ring" / "black.png")
    msg = _validate(project)
    assert "no blank (constant) images: 1 blank images" in msg and "ring/black.png" in msg


def test_9_labels_outside_the_class_list(project):
    write_image_folder(project / "images")
    params = _params()
    stages.run("prepare", params, project)
    y = np.load(project / paths.PREPARED_DIR / "val_y.npy")
    y[0] = 7
    np.save(project / paths.PREPARED_DIR / "val_y.npy", y)
    with pytest.raises(
        stages.StageFailed, match=r"val: labels in class list: 1 labels outside the class list \(7\)"
    ):
        stages.run("validate", params, project)


def test_10_nan_inf_and_out_of_range_values_in_prepared_arrays(project):
    write_image_folder(project / "images")
    params = _params(validate__pixel_max=250)
    stages.run("prepare", params, project)
    x = np.load(project / paths.PREPARED_DIR / "train_x.npy").astype(np.float32)
    x[0, 0, 0, 0] = np.nan
    x[1, 0, 0, 0] = np.inf
    np.save(project / paths.PREPARED_DIR / "train_x.npy", x)
    with pytest.raises(stages.StageFailed) as err:
        stages.run("validate", params, project)
    msg = str(err.value)
    assert "train: no NaN or inf pixels: 2 rows with unexpected finite" in msg
    assert "train: dtype is uint8" in msg and "train: pixel range (max)" in msg


def test_11_an_empty_or_tiny_dataset(project):
    write_image_folder(project / "images", per_class=4)
    msg = _validate(project, validate__min_per_class=1)
    assert "train: at least 20 images: 6 images, fewer than 20: the dataset is empty or tiny" in msg


def test_11_a_folder_of_empty_class_folders(project):
    for label in ("cats", "dogs"):
        (project / "images" / label).mkdir()
    msg = _validate(project)
    assert "train: at least 20 images: 0 images, fewer than 20: the dataset is empty or tiny" in msg
    assert "class cats has 0 in train" in msg


def test_12_test_classes_absent_from_training(project):
    root = project / "images"
    write_image_folder(root, split="train")
    write_image_folder(root, per_class=4, split="test", seed=1)
    shutil.rmtree(root / "train" / "ring")
    msg = _validate(project)
    assert "every test class is in train: classes in test but absent from train: ring" in msg


def test_warn_only_checks_report_without_stopping(project):
    root = write_image_folder(project / "images", per_class=30)
    for i in range(8):
        shutil.copy(root / "left" / "left_001.png", root / "left" / f"again_{i}.png")
    params = _params(validate__max_duplicate_fraction=0.02, validate__warn_only=["duplicates"])
    stages.run("prepare", params, project)
    report = stages.run("validate", params, project)
    assert report["passed"] and not report["failures"]
    assert any("at most 2% duplicate images" in w for w in report["warnings"])
    assert load_json(project / paths.VALIDATION_REPORT)["warnings"] == report["warnings"]


def test_a_failed_validation_is_recorded_in_its_own_mlflow_run(project, store):
    root = write_image_folder(project / "images")
    (root / "ring" / "notes.txt").write_text("x")
    assert "MLflow run " in _validate(project)
    report = load_json(project / paths.VALIDATION_REPORT)
    client = model_client(store)
    run = client.get_run(report["mlflow_run_id"])
    assert run.data.tags["tollgate.validation"] == "failed"
    assert run.data.metrics["validation_failures"] == len(report["failures"]) >= 1
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "data_validation")}
    assert logged == {"data_validation/validation.json", "data_validation/data_docs"}
