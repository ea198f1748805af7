"""Atomic writes: the permissions other tools need, no half-written files, no writing through links."""

from __future__ import annotations

import os
import stat

import pytest

from pipeline.core.files import atomic_dir, write_bytes, write_json, write_text


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_written_files_and_folders_follow_the_umask(tmp_path, umask_022):
    # an MLflow or KServe server running as another user must be able to read model.json
    write_json(tmp_path / "model.json", {"a": 1})
    assert _mode(tmp_path / "model.json") == 0o644
    with atomic_dir(tmp_path / "models") as tmp:
        write_text(tmp / "inside.txt", "x")
    assert _mode(tmp_path / "models") == 0o755 and _mode(tmp_path / "models" / "inside.txt") == 0o644
    os.umask(0o077)
    write_text(tmp_path / "private.txt", "x")
    assert _mode(tmp_path / "private.txt") == 0o600


def test_a_secret_is_owner_only_whatever_the_umask(tmp_path, umask_022):
    write_json(tmp_path / "server.json", {"token": "t"}, mode=0o600)
    assert _mode(tmp_path / "server.json") == 0o600


def test_a_symlink_at_the_target_is_replaced_not_written_through(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (tmp_path / "server.json").symlink_to(victim)
    write_json(tmp_path / "server.json", {"token": "t"}, mode=0o600)
    assert victim.read_text() == "keep me"
    assert not (tmp_path / "server.json").is_symlink()


def test_a_failed_write_leaves_the_old_file_and_no_temp_files(tmp_path):
    write_text(tmp_path / "report.json", "old")
    with pytest.raises(TypeError):  # fails half-way: the temp file exists when the write breaks
        write_bytes(tmp_path / "report.json", "not bytes")
    assert (tmp_path / "report.json").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]
