"""`tollgate schedule` (or `python -m flows.deployments`): serve the deployments of prefect.yaml from this one
process with `prefect.serve`, for teams without a work pool and worker. Same flows, parameters and cron
schedules as `prefect deploy --all` creates: both read prefect.yaml, so the two never disagree.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import yaml

PREFECT_YAML = "prefect.yaml"


def deployments(root: Path) -> list:
    """RunnerDeployments for the entries of prefect.yaml that run in this checkout; flows import from the
    project's `flows` package. Entries with pull steps of their own (nightly-retrain-team clones the
    repository elsewhere) are for workers, not for this process."""
    from prefect.schedules import Cron

    spec = yaml.safe_load((root / PREFECT_YAML).read_text())
    out = []
    for d in spec["deployments"]:
        if "pull" in d:
            continue
        module, attr = d["entrypoint"].split(":")
        flow = getattr(importlib.import_module(module.removesuffix(".py").replace("/", ".")), attr)
        schedules = [
            Cron(s["cron"], timezone=s.get("timezone", "UTC"), active=s.get("active", True))
            for s in d.get("schedules", [])
        ]
        out.append(
            flow.to_deployment(
                name=d["name"],
                description=d.get("description"),
                parameters=d.get("parameters") or {},
                schedules=schedules or None,
                concurrency_limit=d.get("concurrency_limit"),
                tags=d.get("tags"),
            )
        )
    return out


def main(root: Path | None = None) -> None:
    from prefect import serve

    serve(*deployments(root or Path.cwd()))


if __name__ == "__main__":
    main()
