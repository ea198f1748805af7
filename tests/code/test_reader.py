"""A serving replica reads the registry without MLflow's client (`pipeline.registry.reader`). It must read
what MLflow's client reads from the same store, or replicas would serve another version than promotion
moved: these tests build a real MLflow store with MLflow's own client and read it both ways. (The REST
reader is checked against a real tracking server in tests/system/test_team.py.)"""

from __future__ import annotations

import sqlite3
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from pipeline.registry.reader import CLIENT_ONLY, RestReads, SqliteReads, reader
from pipeline.registry.store import CANARY_WEIGHT, Store, connect
from pipeline.training.model_folder import MLFLOW_ARTIFACT
from tests.support import shipped_params

NAME = "tollgate-classifier"


def _logged_model(folder: Path, weights: bytes) -> str:
    """A folder laid out as register logs a model: MLmodel naming the weights + metadata folder."""
    (folder / "artifacts" / "model").mkdir(parents=True)
    (folder / "artifacts" / "model" / "model.pt").write_bytes(weights)
    (folder / "artifacts" / "model" / "model.json").write_text('{"classes": ["a", "b"]}')
    flavor = {"python_function": {"artifacts": {MLFLOW_ARTIFACT: {"path": "artifacts/model"}}}}
    (folder / "MLmodel").write_text(yaml.safe_dump({"flavors": flavor}))
    return folder.as_uri()


@pytest.fixture
def store(tmp_path, monkeypatch) -> Store:
    """Three versions by MLflow's client: v2 @champion, v1 @previous, v3 @challenger then deleted, a
    canary weight and another tag on the registered model."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    store = connect(shipped_params(), tmp_path)
    client = store.client
    client.create_registered_model(NAME)
    for v in (1, 2, 3):
        client.create_model_version(NAME, _logged_model(tmp_path / f"logged-{v}", bytes([v]) * 64))
    client.set_registered_model_alias(NAME, "previous", "1")
    client.set_registered_model_alias(NAME, "champion", "2")
    client.set_registered_model_alias(NAME, "challenger", "3")
    client.delete_model_version(NAME, "3")
    client.set_registered_model_tag(NAME, CANARY_WEIGHT, "12.5")
    client.set_registered_model_tag(NAME, "owner", "team")
    return store


def _folder(reads, uri: str) -> dict[str, bytes]:
    with tempfile.TemporaryDirectory() as tmp:
        folder = reads.download_model_dir(uri, Path(tmp))
        return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_the_sqlite_reader_reads_what_mlflows_client_reads(store, tmp_path):
    lean = reader(shipped_params(), tmp_path)
    assert isinstance(lean, SqliteReads) and lean.uri == store.uri
    for alias in ("champion", "previous", "challenger", "canary"):
        assert lean.version(NAME, alias) == store.version(NAME, alias), alias
    assert lean.version(NAME, "champion").version == "2"
    assert lean.version(NAME, "challenger") is None  # its version was deleted
    assert lean.version("no-such-model", "champion") is None is store.version("no-such-model", "champion")
    assert lean.model_tags(NAME) == store.model_tags(NAME) == {CANARY_WEIGHT: "12.5", "owner": "team"}
    assert lean.canary_weight(NAME) == store.canary_weight(NAME) == 12.5
    assert lean.model_tags("no-such-model") == {} == store.model_tags("no-such-model")
    for version in ("1", "2"):
        uri = f"models:/{NAME}/{version}"
        assert lean.location(uri) == store.location(uri)
        assert _folder(lean, uri) == _folder(store, uri)
    assert _folder(lean, uri)["model.pt"] == bytes([2]) * 64
    with pytest.raises(LookupError, match="no version 3"):
        lean.location(f"models:/{NAME}/3")


def test_the_replica_reader_never_imports_mlflow(store, tmp_path):
    """In a fresh interpreter: the reader, its reads and a folder fetched leave mlflow unimported."""
    code = (
        "import sys, tempfile; from pathlib import Path\n"
        "from pipeline.registry.reader import reader\n"
        "from tests.support import shipped_params\n"
        f"r = reader(shipped_params(), Path({str(tmp_path)!r}))\n"
        f"assert r.version({NAME!r}, 'champion').version == '2'\n"
        f"assert r.canary_weight({NAME!r}) == 12.5\n"
        f"r.read_model_dir('models:/{NAME}/2', lambda folder: (folder / 'model.pt').read_bytes())\n"
        "print(sorted(m for m in sys.modules if m == 'mlflow' or m.startswith('mlflow.')))\n"
    )
    import subprocess

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_store_laid_out_otherwise_is_read_by_mlflows_client(store, tmp_path):
    """Tables other than this MLflow's (here: a column renamed) are not guessed at: MLflow's client reads
    them (and migrates them, or says what is wrong)."""
    con = sqlite3.connect(tmp_path / "mlflow.db")
    con.execute("ALTER TABLE registered_model_aliases RENAME COLUMN workspace TO space")
    con.commit()
    con.close()
    fallback = reader(shipped_params(), tmp_path)
    assert isinstance(fallback, Store)


def test_before_the_first_run_there_is_no_database_and_no_model(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    lean = reader(shipped_params(), tmp_path)
    assert isinstance(lean, SqliteReads)
    assert lean.version(NAME, "champion") is None and lean.model_tags(NAME) == {}
    assert not (tmp_path / "mlflow.db").exists()  # reading made nothing


@pytest.mark.parametrize("setting", CLIENT_ONLY)
def test_a_server_wanting_what_only_mlflows_client_speaks_is_read_by_it(setting, tmp_path, monkeypatch):
    """An auth plugin or a client certificate: the REST reader would be refused, MLflow's client is not.
    (Connecting to a server does not reach it until a read: the server need not exist here.)"""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    assert isinstance(reader(shipped_params(), tmp_path), RestReads)
    monkeypatch.setenv(setting, "something")
    monkeypatch.setattr("pipeline.registry.reader.connect", lambda params, root: "mlflow's client")
    assert reader(shipped_params(), tmp_path) == "mlflow's client"
