import hashlib

import numpy as np

from pipeline.data.prepared import SPLITS, channel_stats, load_split, prepare, read_manifest, stratified_split
from tests.support import config


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_prepare_is_byte_identical_for_same_inputs_and_seed(prepared_digits, tmp_path):
    again = tmp_path / "again"
    prepare(config("data"), 42, again)
    assert _digest(again) == _digest(prepared_digits)


def test_another_seed_gives_another_split_and_data_version(prepared_digits, tmp_path):
    other = tmp_path / "other"
    manifest = prepare(config("data"), 7, other)
    assert manifest["data_version"] != read_manifest(prepared_digits)["data_version"]
    assert not np.array_equal(load_split(other, "test").x, load_split(prepared_digits, "test").x)


def test_splits_partition_the_dataset_and_are_stratified():
    y = np.repeat(np.arange(4), [100, 50, 30, 20])
    idx = stratified_split(y, val_fraction=0.1, test_fraction=0.2, seed=0)
    all_idx = np.concatenate([idx[s] for s in SPLITS])
    assert sorted(all_idx.tolist()) == list(range(len(y)))
    for label, n in enumerate([100, 50, 30, 20]):
        assert (y[idx["test"]] == label).sum() == round(0.2 * n)
        assert (y[idx["val"]] == label).sum() == round(0.1 * n)


def test_manifest_describes_the_arrays(prepared_digits):
    manifest = read_manifest(prepared_digits)
    assert manifest["classes"] == [str(d) for d in range(10)]
    assert manifest["image_shape"] == [8, 8, 1]
    for split in SPLITS:
        part = load_split(prepared_digits, split)
        assert part.x.dtype == np.uint8 and part.x.shape[1:] == (8, 8, 1)
        counts = np.bincount(part.y, minlength=10).tolist()
        assert counts == [manifest["counts"][split][c] for c in manifest["classes"]]
    assert sum(sum(c.values()) for c in manifest["counts"].values()) == 1797


def test_normalisation_comes_from_the_training_split_only(prepared_digits):
    manifest = read_manifest(prepared_digits)
    train_stats = channel_stats(np.asarray(load_split(prepared_digits, "train").x))
    test_stats = channel_stats(np.asarray(load_split(prepared_digits, "test").x))
    assert [manifest["normalization"]["mean"], manifest["normalization"]["std"]] == list(train_stats)
    assert list(test_stats) != list(train_stats)


def test_a_failed_prepare_leaves_the_previous_output_intact(prepared_digits, tmp_path, monkeypatch):
    import shutil

    import pytest

    out = tmp_path / "prepared"
    shutil.copytree(prepared_digits, out)
    before = _digest(out)

    def broken_save(path, arr):
        raise OSError("disk full")

    monkeypatch.setattr(np, "save", broken_save)
    with pytest.raises(OSError):
        prepare(config("data"), 1, out)
    assert _digest(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["prepared"]
