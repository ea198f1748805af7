"""The registry as a serving replica reads it, without importing mlflow.

A champion-following `tollgate serve` reads three things, every `serve.follow_interval_s`: the version
behind an alias, the registered model's tags (canary weight, rollout state) and, when a version changes,
its model folder. Through MLflow's client that costs the client itself in every replica: ~160 MB resident
(the tracking stack, SQLAlchemy, FastAPI through `mlflow.gateway`) and ~2 s of start-up, for three reads.
So a replica reads them where MLflow keeps them:

- the embedded store (`sqlite:///...`): MLflow's tables, read-only; a schema this code does not know
  (another MLflow) is found at connection and answered by MLflow's client instead;
- a tracking server (`http(s)://`): the REST endpoints MLflow's own client calls, with its credentials
  (MLFLOW_TRACKING_TOKEN, or MLFLOW_TRACKING_USERNAME/PASSWORD) and TLS settings;
- any other store (a database URI given directly, Databricks), or a server that wants what only MLflow's
  client speaks (an auth plugin, a client certificate: `CLIENT_ONLY`): MLflow's client (`store.connect`).

A model folder on this machine's disk is copied; one anywhere else (S3, a server's proxied artifacts) is
fetched by a short-lived child process with MLflow's own client, so MLflow's code reads every artifact
store and its memory leaves with the child. Writes (promotion, rollout, a killed promotion's recovery)
never come through here: they go through `Store`.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import sqlite3
import ssl
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from pipeline.core.config import Params
from pipeline.registry.store import (
    ABSENT,
    Reads,
    Store,
    VersionRef,
    connect,
    http_defaults,
    tracking_uri,
    weights_path,
)

_DEFAULT_WORKSPACE = "default"  # MLflow's rows outside any workspace (mlflow.utils.workspace_utils)
_DELETED = "Deleted_Internal"  # a model version MLflow deleted but keeps (current_stage)
_SQLITE = "sqlite:///"
# MLflow client settings that this module does not speak: with any of them set, MLflow's client reads
CLIENT_ONLY = ("MLFLOW_TRACKING_AUTH", "MLFLOW_TRACKING_CLIENT_CERT_PATH")


def reader(params: Params, root: Path) -> Reads:
    """The lean reader of the project's store, or MLflow's client where there is none."""
    uri = tracking_uri(params, root)
    http_defaults(params, uri)
    if uri.startswith(("http://", "https://")) and not any(os.environ.get(var) for var in CLIENT_ONLY):
        return RestReads(uri, params.mlflow.http_timeout_s)
    if uri.startswith(_SQLITE):
        sqlite = SqliteReads(uri, params.mlflow.http_timeout_s)
        if sqlite.schema_known():
            return sqlite
        print(f"[tollgate] {uri}: tables not as this tollgate reads them; using MLflow's client", flush=True)
    return connect(params, root)


class _LeanReads(Reads):
    """Folder fetching shared by the lean readers: a local folder is copied, anything else is fetched by
    MLflow's client in a child process."""

    uri: str

    def download_model_dir(self, uri: str, dst: Path) -> Path:
        base = self.location(uri)
        local = _local_path(base)
        if local is None:
            return _fetch_in_child(self.uri, uri, dst)
        folder = local / weights_path((local / "MLmodel").read_text())
        shutil.copytree(folder, dst / folder.name)
        return dst / folder.name


class SqliteReads(_LeanReads):
    """MLflow's SQLite registry tables, opened read-only for each read (a promotion writes between them)."""

    def __init__(self, uri: str, timeout_s: float):
        self.uri = uri
        self.path = Path(uri.removeprefix(_SQLITE))
        self.timeout_s = timeout_s

    def _rows(self, sql: str, *args) -> list[tuple]:
        con = sqlite3.connect(f"{self.path.as_uri()}?mode=ro", uri=True, timeout=self.timeout_s)
        try:
            return con.execute(sql, args).fetchall()
        finally:
            con.close()

    def schema_known(self) -> bool:
        """The columns read here exist (or there is no database yet: MLflow makes it as this one reads)."""
        if not self.path.exists():
            return True
        try:
            self._rows("SELECT workspace, name, alias, version FROM registered_model_aliases LIMIT 0")
            self._rows("SELECT workspace, name, key, value FROM registered_model_tags LIMIT 0")
            self._rows(
                "SELECT workspace, name, version, run_id, current_stage, storage_location, source "
                "FROM model_versions LIMIT 0"
            )
        except sqlite3.OperationalError:
            return False
        return True

    def version(self, name: str, alias: str) -> VersionRef | None:
        if not self.path.exists():
            return None
        rows = self._rows(
            "SELECT v.version, v.run_id FROM registered_model_aliases a JOIN model_versions v "
            "ON v.workspace = a.workspace AND v.name = a.name AND v.version = a.version "
            "WHERE a.workspace = ? AND a.name = ? AND a.alias = ? AND v.current_stage != ?",
            _DEFAULT_WORKSPACE, name, alias, _DELETED,
        )  # fmt: skip
        return VersionRef(name, str(rows[0][0]), rows[0][1]) if rows else None

    def model_tags(self, name: str) -> dict[str, str]:
        if not self.path.exists():
            return {}
        sql = "SELECT key, value FROM registered_model_tags WHERE workspace = ? AND name = ?"
        return dict(self._rows(sql, _DEFAULT_WORKSPACE, name))

    def download_uri(self, name: str, version: str) -> str:
        rows = self._rows(
            "SELECT storage_location, source FROM model_versions "
            "WHERE workspace = ? AND name = ? AND version = ? AND current_stage != ?",
            _DEFAULT_WORKSPACE, name, int(version), _DELETED,
        )  # fmt: skip
        if not rows:
            raise LookupError(f"{name} has no version {version} in {self.uri}")
        return rows[0][0] or rows[0][1]


class RestReads(_LeanReads):
    """A tracking server's REST API (the endpoints and credentials MLflow's client uses)."""

    def __init__(self, uri: str, timeout_s: float):
        self.uri = uri.rstrip("/")
        self.timeout_s = timeout_s
        self.headers = _auth_headers()
        self.tls = _tls_context()

    def _get(self, endpoint: str, **query: str) -> dict | None:
        """The JSON answer, or None when the server says the thing does not exist."""
        url = f"{self.uri}/api/2.0/mlflow/{endpoint}?{urllib.parse.urlencode(query)}"
        request = urllib.request.Request(url, headers=self.headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s, context=self.tls) as answer:
                return json.load(answer)
        except urllib.error.HTTPError as err:
            try:
                code = json.loads(err.read() or b"{}").get("error_code")
            except ValueError:
                code = None
            if err.code == 404 or code in ABSENT:
                return None
            answered = f"the MLflow tracking server ({self.uri}) answered {err.code} to {endpoint}"
            raise OSError(answered) from None

    def version(self, name: str, alias: str) -> VersionRef | None:
        found = self._get("registered-models/alias", name=name, alias=alias)
        if found is None:
            return None
        mv = found["model_version"]
        return VersionRef(name, str(mv["version"]), mv.get("run_id"))

    def model_tags(self, name: str) -> dict[str, str]:
        found = self._get("registered-models/get", name=name)
        tags = found["registered_model"].get("tags", []) if found else []
        return {tag["key"]: tag.get("value", "") for tag in tags}

    def download_uri(self, name: str, version: str) -> str:
        found = self._get("model-versions/get-download-uri", name=name, version=version)
        if found is None:
            raise LookupError(f"{name} has no version {version} in {self.uri}")
        return found["artifact_uri"]


def _auth_headers() -> dict[str, str]:
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    if token:
        return {"Authorization": f"Bearer {token}"}
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user and password:
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}
    return {}


def _tls_context() -> ssl.SSLContext | None:
    if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true":
        return ssl._create_unverified_context()  # noqa: S323 - the user asked for it, as MLflow's client does
    cert = os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH")
    return ssl.create_default_context(cafile=cert) if cert else None


def _local_path(uri: str) -> Path | None:
    """A folder on this machine (`file:` URI or absolute path), else None."""
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme == "file" and parsed.netloc in ("", "localhost"):
        return Path(urllib.request.url2pathname(parsed.path))
    return Path(uri) if parsed.scheme == "" and uri.startswith("/") else None


def _fetch_in_child(store_uri: str, uri: str, dst: Path) -> Path:
    cmd = [sys.executable, "-m", __name__, store_uri, uri, str(dst)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise OSError(f"fetching {uri} from {store_uri} failed: {tail}")
    return Path(done.stdout.strip().splitlines()[-1])


def _fetch(store_uri: str, uri: str, dst: str) -> None:
    """The child's side: MLflow's client downloads the folder; its path is the last line printed."""
    print(Store.at(store_uri).download_model_dir(uri, Path(dst)), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    _fetch(*sys.argv[1:4])
