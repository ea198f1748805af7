"""Sources other than the embedded digits: the real MNIST files through torchvision, and image folders."""

from __future__ import annotations

import csv
import hashlib

import numpy as np
import pytest

from pipeline import stages
from pipeline.core.config import load_params
from pipeline.data.expectations import run_suite
from pipeline.data.prepared import FILES, load_split, prepare, read_manifest
from pipeline.data.sources import SourceError
from tests.support import MNIST_FILES, ROOT, config, link_source_files, write_image_folder


@pytest.fixture(scope="module")
def mnist_root(tmp_path_factory):
    """torchvision's layout (<root>/MNIST/raw/*.gz) over the shared original files, read-only."""
    if not MNIST_FILES.is_dir():
        pytest.skip(f"the real MNIST files are not at {MNIST_FILES}")
    return link_source_files(tmp_path_factory.mktemp("mnist"), "mnist", MNIST_FILES)


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_mnist_offline_from_original_files_keeps_the_official_test_set(mnist_root, tmp_path):
    cfg = config("data", source="mnist", root=str(mnist_root))
    manifest = prepare(cfg, 42, tmp_path / "a")
    assert manifest["image_shape"] == [28, 28, 1]
    assert sum(manifest["counts"]["test"].values()) == 10_000
    assert sum(manifest["counts"]["train"].values()) + sum(manifest["counts"]["val"].values()) == 60_000
    for c in manifest["classes"]:  # val is cut per class from the training set
        n = manifest["counts"]["train"][c] + manifest["counts"]["val"][c]
        assert manifest["counts"]["val"][c] == round(0.15 * n)
    test = load_split(tmp_path / "a", "test")
    assert np.bincount(test.y).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    report = run_suite(tmp_path / "a", config("validate"))
    assert report["passed"], report["failures"]
    prepare(cfg, 42, tmp_path / "b")
    assert _digest(tmp_path / "b") == _digest(tmp_path / "a")


def test_a_missing_dataset_with_download_off_fails_with_what_to_do(tmp_path):
    params = load_params(ROOT / "params.yaml").model_copy(
        update={"data": config("data", source="fashion_mnist", root="nowhere")}
    )
    with pytest.raises(stages.StageFailed, match="fashion_mnist not found under .*set data.download: true"):
        stages.run("prepare", params, tmp_path)
    assert not (tmp_path / "data" / "prepared").exists()


def test_imagefolder_resizes_converts_and_lists_every_file_with_its_checksum(tmp_path):
    root = write_image_folder(tmp_path / "images", per_class=10)
    (root / "left" / "readme.txt").write_text("not an image")
    cfg = config("data", source="imagefolder", root=str(root), image_size=[12, 10], channels=1)
    manifest = prepare(cfg, 0, tmp_path / "prepared")
    assert manifest["classes"] == ["left", "ring", "top"] and manifest["image_shape"] == [12, 10, 1]
    with open(tmp_path / "prepared" / FILES) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == manifest["files"]["count"] == 31
    for row in rows:
        assert row["sha256"] == hashlib.sha256((root / row["path"]).read_bytes()).hexdigest()
    assert [r["path"] for r in rows if r["index"] == "-1"] == ["left/readme.txt"]
    # each used file points at its row in its split: the arrays hold exactly those images, in that order
    for split in ("train", "val", "test"):
        part = load_split(tmp_path / "prepared", split)
        used = sorted((int(r["index"]), r["class"]) for r in rows if r["split"] == split)
        assert [c for _, c in used] == [part.classes[k] for k in part.y]
    again = prepare(cfg, 0, tmp_path / "again")
    assert _digest(tmp_path / "again") == _digest(tmp_path / "prepared")
    assert again["data_version"] == read_manifest(tmp_path / "prepared")["data_version"]


def test_explicit_split_folders_are_honoured(tmp_path):
    root = tmp_path / "images"
    write_image_folder(root, per_class=10, split="train")
    write_image_folder(root, per_class=3, split="test", seed=1)
    manifest = prepare(
        config("data", source="imagefolder", root=str(root), image_size=[8, 8]), 0, tmp_path / "p"
    )
    assert manifest["counts"]["test"] == {"left": 3, "ring": 3, "top": 3}
    assert manifest["counts"]["val"] == {"left": 2, "ring": 2, "top": 2}  # cut from train/, not from test/
    with open(tmp_path / "p" / FILES) as f:
        assert all(r["path"].startswith("test/") == (r["split"] == "test") for r in csv.DictReader(f))


def test_a_class_folder_named_like_a_split_is_refused_not_taken_for_a_split(tmp_path):
    root = write_image_folder(tmp_path / "images", per_class=4)
    (root / "ring").rename(root / "test")  # a class that happens to be called "test"
    cfg = config("data", source="imagefolder", root=str(root), image_size=[8, 8])
    with pytest.raises(
        SourceError,
        match=r"ambiguous layout in .*split folders \(test\) and class folders "
        r"\(left, top\) side by side",
    ):
        prepare(cfg, 0, tmp_path / "p")
    assert not (tmp_path / "p").exists()


def test_images_directly_in_a_split_folder_are_refused(tmp_path):
    root = tmp_path / "images"
    write_image_folder(root / "train", per_class=4)
    for f in sorted((root / "train" / "left").iterdir())[:2]:
        f.rename(root / "train" / f.name)  # loose files: "train" was meant as a class
    cfg = config("data", source="imagefolder", root=str(root), image_size=[8, 8])
    with pytest.raises(SourceError, match=r"train holds files directly \(left_000.png, left_001.png\)"):
        prepare(cfg, 0, tmp_path / "p")


def test_a_crafted_archive_cannot_write_outside_the_data_folder(tmp_path):
    import io
    import tarfile

    root = tmp_path / "data" / "raw"
    root.mkdir(parents=True)
    archive = root / "cifar-10-python.tar.gz"  # where torchvision's CIFAR-10 archive goes
    with tarfile.open(archive, "w:gz") as tar:
        payload = b"pwned"
        member = tarfile.TarInfo("../escaped.txt")
        member.size = len(payload)
        tar.addfile(member, io.BytesIO(payload))
    with pytest.raises(SourceError, match="unsafe to unpack"):
        prepare(config("data", source="cifar10", root=str(root)), 0, tmp_path / "p")
    assert not (tmp_path / "data" / "escaped.txt").exists()
    assert not (root.parent / "escaped.txt").exists()


def _jpeg_folder(root, n: int) -> None:
    """`n` small mixed-size JPEGs of two classes, a large one (decoded in draft mode) and a truncated one."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        size = (int(rng.integers(12, 40)), int(rng.integers(12, 40)))
        pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(root / f"c{i % 2}" / f"{i:04d}.jpg")
    Image.fromarray(rng.integers(0, 256, (400, 300, 3), dtype=np.uint8)).save(root / "c0" / "big.jpg")
    whole = (root / "c1" / "0001.jpg").read_bytes()
    (root / "c1" / "0003.jpg").write_bytes(whole[: len(whole) // 2])  # a header, then nothing


def test_decoding_on_every_core_gives_what_one_process_gives(tmp_path):
    """One process or two; data.channels fixed (one pass: checksum, header, pixels) or as found (two)."""
    from pipeline.data import decoding
    from pipeline.data.sources import load_imagefolder

    root = tmp_path / "images"
    _jpeg_folder(root, decoding.PARALLEL_FROM + 88)
    results = {}
    for workers, channels in ((1, 3), (2, 3), (2, 0)):
        scratch = tmp_path / f"scratch{workers}{channels}"
        scratch.mkdir()
        cfg = config("data", source="imagefolder", root=str(root), image_size=[16, 16], channels=channels,
                     decode_workers=workers)  # fmt: skip
        results[workers, channels] = load_imagefolder(cfg, root, scratch)
    one, many, found = results[1, 3], results[2, 3], results[2, 0]
    for other in (many, found):
        assert np.array_equal(np.asarray(one.x), np.asarray(other.x)) and np.array_equal(one.y, other.y)
        assert one.files == other.files
    bad = [r for r in many.files if r["error"]]
    assert [r["path"] for r in bad] == ["c1/0003.jpg"] and bad[0]["error"].startswith("unreadable")
    assert len(many.y) == decoding.PARALLEL_FROM + 88  # every readable file, the big one too, in order
    assert [r["index"] for r in many.files if not r["error"]] == list(range(len(many.y)))
