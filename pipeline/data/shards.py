"""Live traffic as shards: what servers sampled, what the shadow challenger did and what users labelled, in
a folder every server of a model can share (`monitor.folder`: data/live by default, or `s3://bucket/prefix`
for replicas on several machines; `data.feedback` for labels).

A shard is one .npz (numpy arrays, no pickles) named `<kind>-<ms of its first row>-<writer>-<seq>.npz`
(`writer` is unique per process, so replicas never overwrite each other), and sorting by name sorts by
time across servers. Kinds and their columns, one row per image:
- samples: x (the model input exactly as the model saw it: uint8 when every value is a whole 0..255 number,
  else float32), pred (class index), confidence, embedding (penultimate layer, float16), version,
  request (id), item (position in the request), time (Unix seconds);
- shadow: request, item, time, version, challenger (its version), pred and challenger_pred (class names),
  confidence, challenger_confidence, latency_ms (challenger's forward pass), error (it raised);
- feedback: x (uint8), label, request, item, time (see `pipeline.data.feedback`).
Nothing else of a request is kept: no headers, no client address, no raw body. A file that is not a shard
is left alone (never deleted, never read); a shard that cannot be read (truncated, emptied) is skipped,
counted and named.
"""

from __future__ import annotations

import io
import os
import re
import secrets
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.core.files import arrays_bytes, write_bytes

SAMPLES = "samples"
SHADOW = "shadow"
FEEDBACK = "feedback"
NAME = re.compile(r"^(samples|shadow|feedback)-(\d{13})-([0-9a-z]+)-(\d{6})\.npz$")
WRITER = f"{os.getpid()}{secrets.token_hex(3)}"  # this process, among every server writing to a folder
# Request ids name files: a client-chosen X-Request-ID must be safe as a file name part.
REQUEST_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class DamagedShard(ValueError):
    """A shard that cannot be read: truncated, emptied, or not an .npz at all."""


class Folder:
    """Where shards live. `names` lists what is there, with sizes; `read`, `write` (atomic: a reader sees
    the whole shard or none) and `delete` move bytes."""

    where = ""

    def names(self) -> dict[str, int]:
        raise NotImplementedError

    def read(self, name: str) -> bytes:
        raise NotImplementedError

    def write(self, name: str, data: bytes) -> None:
        raise NotImplementedError

    def delete(self, name: str) -> None:
        raise NotImplementedError


class LocalFolder(Folder):
    def __init__(self, path: Path):
        self.path = path
        self.where = str(path)

    def names(self) -> dict[str, int]:
        if not self.path.is_dir():
            return {}
        found = {}
        for p in self.path.iterdir():
            try:
                found[p.name] = p.stat().st_size
            except OSError:  # removed meanwhile
                continue
        return found

    def read(self, name: str) -> bytes:
        return (self.path / name).read_bytes()

    def write(self, name: str, data: bytes) -> None:
        write_bytes(self.path / name, data)

    def delete(self, name: str) -> None:
        (self.path / name).unlink(missing_ok=True)


class S3Folder(Folder):
    """An S3 prefix (S3, MinIO, the team stack's stand-in). boto3 finds the endpoint and credentials the
    usual way: AWS_ENDPOINT_URL_S3 (or AWS_ENDPOINT_URL), AWS_ACCESS_KEY_ID, a profile."""

    def __init__(self, url: str):
        import boto3

        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        self.bucket, self.prefix = bucket, prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.where = url.rstrip("/")
        self.client = boto3.client("s3")

    def names(self) -> dict[str, int]:
        found = {}
        for page in self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.prefix
        ):
            for obj in page.get("Contents", []):
                rest = obj["Key"][len(self.prefix) :]
                if "/" not in rest:
                    found[rest] = obj["Size"]
        return found

    def read(self, name: str) -> bytes:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self.prefix + name)["Body"].read()
        except self.client.exceptions.NoSuchKey:
            raise FileNotFoundError(f"{self.where}/{name}") from None

    def write(self, name: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self.prefix + name, Body=data)  # whole or nothing

    def delete(self, name: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self.prefix + name)


def open_folder(spec: str, root: Path) -> Folder:
    """`s3://bucket/prefix` or a path (relative paths are taken from `root`)."""
    return S3Folder(spec) if spec.startswith("s3://") else LocalFolder(root / spec)


def shard_name(kind: str, first: float, seq: int) -> str:
    return f"{kind}-{int(first * 1000):013d}-{WRITER}-{seq:06d}.npz"


def shard_time(name: str) -> float:
    """When the shard's first row was taken (Unix seconds), from its name."""
    return int(NAME.match(name).group(2)) / 1000


def shard_names(folder: Folder, kind: str, listing: dict[str, int] | None = None) -> list[str]:
    """The shards of a kind, oldest first (from `listing`, one `folder.names()` already taken, so that a
    caller's names and sizes agree while other processes write and delete); nothing else is listed."""
    names = folder.names() if listing is None else listing
    return sorted(n for n in names if (m := NAME.match(n)) and m.group(1) == kind)


def write_shard(folder: Folder, name: str, columns: dict[str, np.ndarray]) -> None:
    folder.write(name, arrays_bytes(columns))


def read_shard(folder: Folder, name: str) -> dict[str, np.ndarray]:
    """The columns of one shard; DamagedShard when it cannot be read, FileNotFoundError when it is gone."""
    try:
        data = folder.read(name)
    except FileNotFoundError:
        raise
    except OSError as err:
        raise DamagedShard(f"{folder.where}/{name}: {err}") from None
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (ValueError, EOFError, OSError, KeyError, zipfile.BadZipFile) as err:
        raise DamagedShard(f"{folder.where}/{name}: {type(err).__name__}: {err}") from None


SAID: set[str] = set()  # damaged shards this process has named already


@dataclass
class Reading:
    """What a reader met besides rows: the damaged shards it skipped (each named once per process)."""

    damaged: list[str] = field(default_factory=list)
    vanished: int = 0  # listed, then gone before they were read (retention, a merge)

    def note(self, err: DamagedShard) -> None:
        self.damaged.append(str(err))
        if str(err) not in SAID:
            SAID.add(str(err))
            print(f"[tollgate] skipping a damaged shard: {err}", file=sys.stderr, flush=True)


def concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """One table of the parts that have rows and the newest part's columns and shapes (a champion with
    other inputs writes shards of its own; only the shapes of the newest rows are read together)."""
    parts = [p for p in parts if len(p.get("time", ())) > 0]
    if not parts:
        return {}
    newest = parts[-1]
    same = [
        p for p in parts if set(p) == set(newest) and all(p[k].shape[1:] == newest[k].shape[1:] for k in p)
    ]
    return {k: np.concatenate([p[k] for p in same]) for k in newest}


def read_latest(
    folder: Folder,
    kind: str,
    n: int | None = None,
    version: str | None = None,
    reading: Reading | None = None,
) -> dict:
    """The newest `n` rows of a kind (all when None), of one served version when given, oldest first.
    Reads shards from the newest back, so a long history costs only what the window needs; damaged shards
    are skipped and noted in `reading`."""
    reading = reading or Reading()
    parts, have = [], 0
    for name in reversed(shard_names(folder, kind)):
        try:
            part = read_shard(folder, name)
        except FileNotFoundError:  # deleted by retention or merged meanwhile
            reading.vanished += 1
            continue
        except DamagedShard as err:
            reading.note(err)
            continue
        if version is not None and "version" in part:
            keep = part["version"] == version
            part = {k: v[keep] for k, v in part.items()}
        parts.append(part)
        have += len(part.get("time", ()))
        if n is not None and have >= n:
            break
    rows = concat(parts[::-1])
    if rows:
        order = np.argsort(rows["time"], kind="stable")
        rows = {k: v[order][-n:] if n is not None else v[order] for k, v in rows.items()}
    return rows


def enforce_retention(
    folder: Folder, max_bytes: float, max_age_s: float, now: float | None = None, kinds=(SAMPLES, SHADOW)
) -> int:
    """Delete shards of `kinds` older than `max_age_s`, then the oldest until they hold at most `max_bytes`;
    returns how many went. Files that are not such shards are neither counted nor deleted."""
    now = time.time() if now is None else now
    sizes = {n: s for n, s in folder.names().items() if (m := NAME.match(n)) and m.group(1) in kinds}
    total, gone = sum(sizes.values()), 0
    for name in sorted(sizes, key=lambda n: (NAME.match(n).group(2), n)):
        if not (now - shard_time(name) > max_age_s or total > max_bytes):
            continue
        folder.delete(name)
        total -= sizes[name]
        gone += 1
    return gone


def model_input(x: np.ndarray) -> np.ndarray:
    """The input compactly and exactly: uint8 when that loses nothing, else float32."""
    if x.dtype == np.uint8:
        return x
    if np.all((x >= 0) & (x <= 255) & (x == np.round(x))):
        return x.astype(np.uint8)
    return x.astype(np.float32)
