"""A user's own folder of images, end to end with `dvc repro`: PNGs of two sizes and both colour modes
become a registered model; one new image is a new data version that re-runs prepare onwards; touching
nothing runs nothing."""

import json

import pytest

from pipeline.core import paths
from tests.support import make_project, model_client, run, set_param, write_image, write_image_folder

pytestmark = pytest.mark.slow
NAME = "tollgate-classifier"


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    project = make_project(tmp_path_factory.mktemp("imagefolder") / "project")
    write_image_folder(project / "data" / "raw", per_class=24)
    set_param(project, "data.source", "imagefolder")
    set_param(project, "data.image_size", [16, 16])
    set_param(project, "data.channels", 3)
    set_param(project, "train.batch_size", 8)  # 45 training images: enough steps to learn from
    return project


@pytest.fixture(scope="module")
def first_repro(project):
    """The output of the first `dvc repro` over the folder."""
    return run(["dvc", "repro"], cwd=project).stdout


def _manifest(project):
    return json.loads((project / paths.PREPARED_DIR / "manifest.json").read_text())


def test_a_folder_of_mixed_images_becomes_a_registered_model(project, first_repro):
    assert "Running stage 'promote'" in first_repro
    manifest = _manifest(project)
    assert manifest["source"] == "imagefolder" and manifest["image_shape"] == [16, 16, 3]
    assert manifest["files"]["count"] == 72
    client = model_client(project)
    mv = client.get_model_version(NAME, "1")
    assert mv.tags["data_version"] == manifest["data_version"]
    # the data validation that let this model train is on its run: JSON and the Data Docs site
    logged = {a.path for a in client.list_artifacts(mv.run_id, "data_validation/data_docs")}
    assert "data_validation/data_docs/index.html" in logged
    assert json.loads((project / paths.PROMOTION).read_text())["promoted"]


def test_touching_nothing_is_a_no_op(project, first_repro):
    out = run(["dvc", "repro"], cwd=project).stdout
    assert "Running stage" not in out and "Data and pipelines are up to date" in out


def test_one_new_image_is_a_new_data_version_and_reruns_prepare_onwards(project, first_repro):
    run(["dvc", "repro"], cwd=project)
    before = _manifest(project)["data_version"]
    write_image(project / "data" / "raw" / "ring" / "new.png", "ring", (40, 30), "RGB", 12345)
    status = run(["dvc", "status", "prepare"], cwd=project).stdout
    assert "data/raw" in status and "modified" in status
    out = run(["dvc", "repro"], cwd=project).stdout
    for stage in ("prepare", "validate", "train", "evaluate", "register"):
        assert f"Running stage '{stage}'" in out
    after = _manifest(project)
    assert after["data_version"] != before and after["files"]["count"] == 73
    versions = model_client(project).search_model_versions(f"name='{NAME}'")
    assert {mv.tags["data_version"] for mv in versions} == {before, after["data_version"]}
