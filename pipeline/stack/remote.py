"""`tollgate data push|pull`: `dvc push` / `dvc pull` to the checkout's default DVC remote, after a check that
fails in seconds, naming the remote, when it cannot work.

Against an S3 endpoint that is down, `dvc push` retries for half a minute and then reports a URL; without
credentials it says "Unable to locate credentials" and nothing more. The check asks the bucket once, with
one attempt and short timeouts, using the same settings DVC will use (the remote's endpoint, credentials
from `.dvc/config.local`, the AWS variables or profile); then DVC does the transfer as usual. Remotes
other than S3 go straight to DVC.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from urllib.parse import urlparse

from pipeline.core.errors import Failure


class RemoteError(Failure):
    """The DVC remote cannot be used; the message names it and says why."""


def default_remote(root: Path) -> tuple[str, dict]:
    """(name, settings) of the default DVC remote, local config (credentials) merged in."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        name = repo.config["core"].get("remote")
        if not name:
            raise RemoteError("this checkout has no default DVC remote: dvc remote add -d <name> <url>")
        return name, dict(repo.config["remote"][name])


def check(root: Path, timeout_s: float = 5.0) -> str:
    """Raise RemoteError unless the default remote answers; returns how it was reached, for a log line."""
    name, conf = default_remote(root)
    url = conf["url"]
    if not url.startswith("s3://"):
        return f"DVC remote '{name}' ({url})"
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError

    endpoint = conf.get("endpointurl")
    where = f"DVC remote '{name}' ({url}" + (f" at {endpoint})" if endpoint else ")")
    session = boto3.Session(
        aws_access_key_id=conf.get("access_key_id"),
        aws_secret_access_key=conf.get("secret_access_key"),
        aws_session_token=conf.get("session_token"),
        profile_name=conf.get("profile"),
        region_name=conf.get("region") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
    )
    if session.get_credentials() is None:
        raise RemoteError(
            f"{where}: no credentials. Give them to DVC for this checkout: dvc remote modify --local {name} "
            f"access_key_id ... (and secret_access_key), or set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
        )
    once = Config(retries={"max_attempts": 1}, connect_timeout=timeout_s, read_timeout=timeout_s)
    client = session.client("s3", endpoint_url=endpoint, config=once)
    try:
        client.head_bucket(Bucket=urlparse(url).netloc)
    except (BotoCoreError, ClientError) as err:
        raise RemoteError(f"{where} cannot be used: {err}") from None
    return where


def transfer(root: Path, direction: str) -> None:
    """`dvc push` or `dvc pull` after `check`; DVC's own output goes to the terminal."""
    where = check(root)
    print(f"[tollgate] dvc {direction} with {where}", flush=True)
    if subprocess.run(["dvc", direction], cwd=root).returncode != 0:
        raise RemoteError(f"dvc {direction} with {where} failed (see DVC's message above)")
