"""Every file write goes through here: write beside the target, then rename, so a killed stage never
leaves a half-written output that DVC or the registry could mistake for a finished one.

Files are created with the process umask (0644 under the usual 022), like any other tool's output: an
MLflow or KServe server running as another user must be able to read a model. Secrets pass `mode`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")


def write_bytes(path: str | Path, data: bytes, mode: int = 0o666) -> None:
    """Replace `path` with `data` atomically. `mode` is filtered by the umask, as open(2) does; the rename
    replaces a symlink at `path` rather than writing through it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str, mode: int = 0o666) -> None:
    write_bytes(path, text.encode(), mode)


def write_json(path: str | Path, obj: Any, mode: int = 0o666) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n", mode)


def write_csv(path: str | Path, rows: list[dict]) -> None:
    """Rows of one shape as CSV with a header (an empty file for no rows)."""
    import csv
    import io

    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    write_text(path, buf.getvalue())


def arrays_bytes(arrays: dict) -> bytes:
    """numpy arrays as the bytes of an .npz (np.load reads it, no pickles), the same bytes for the same
    arrays: np.savez stamps each member with the current time, which would make every model folder a new
    DVC version."""
    import io
    import zipfile

    import numpy as np

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for name, value in arrays.items():
            member = io.BytesIO()
            np.lib.format.write_array(member, np.asarray(value), allow_pickle=False)
            z.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)), member.getvalue())
    return buf.getvalue()


def write_arrays(path: str | Path, arrays: dict) -> None:
    """`arrays_bytes` written atomically to `path`."""
    write_bytes(path, arrays_bytes(arrays))


def load_json(path: str | Path) -> Any:
    """A JSON file that must exist and parse (a stage's own input)."""
    return json.loads(Path(path).read_text())


def read_report(path: str | Path) -> dict:
    """A stage's JSON report, or {} when that stage has not written one (yet)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read a block at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty temp folder that replaces `path` only if the block finishes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path)
    os.mkdir(tmp)  # 0777 less the umask: the output reads like any other folder
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def locked(path: str | Path, waiting: str, timeout: float = -1) -> Iterator[None]:
    """Hold the file lock at `path` (an flock: released by the kernel if this process dies). When another
    process holds it, print `waiting` once and wait up to `timeout` seconds (-1: for as long as it takes);
    raises filelock.Timeout after that."""
    from filelock import FileLock, Timeout

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"[tollgate] {waiting}", flush=True)
        lock.acquire(timeout=timeout)
    try:
        yield
    finally:
        lock.release()
