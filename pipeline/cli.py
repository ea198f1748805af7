"""`tollgate`: the DVC stages, the server, the summary and the Prefect flow behind one command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.config import STAGES


def _parser() -> argparse.ArgumentParser:
    from pipeline.serving import add_arguments

    p = argparse.ArgumentParser(prog="tollgate", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    for stage in STAGES:
        sub.add_parser(stage, help=f"run the {stage} stage (what dvc.yaml calls)")
    add_arguments(sub.add_parser("serve", help="HTTP inference server on models:/<name>@champion"))
    rb = sub.add_parser("rollback", help="make an earlier version @champion again, verified like a promotion")
    rb.add_argument("--to", help="version to restore (default: the one behind @previous)")
    d = sub.add_parser("deploy", help="hand @champion to a serving target (default: serve.target)")
    d.add_argument("--target", choices=["local", "mlflow", "kserve", "torchserve"])
    sub.add_parser("summary", help="one screen on the last pipeline run")
    sub.add_parser("monitor", help="drift of the newest live samples against the served version's reference")
    sub.add_parser("shadow", help="how the @challenger in shadow did beside the champion on live traffic")
    sm = sub.add_parser("samples", help="write test-split images as PNG files to send to the server")
    sm.add_argument("--out", default="samples")
    sm.add_argument("-n", type=int, default=5)
    pr = sub.add_parser("profile", help="print the `dvc exp run` arguments that apply a params profile")
    pr.add_argument("file", help="e.g. profiles/mnist-cpu.yaml")
    sub.add_parser("schedule", help="serve the prefect.yaml deployments and schedules from this process")
    dt = sub.add_parser("data", help="dvc push / pull with the default remote, failing fast if it cannot")
    dt.add_argument("direction", choices=["push", "pull"])
    st = sub.add_parser("stack", help="the team's services on this machine: PostgreSQL, S3, MLflow, Prefect")
    st.add_argument("action", choices=["up", "down", "status", "env"])
    st.add_argument("--purge", action="store_true", help="with down: delete the services' data too")
    f = sub.add_parser("flow", help="run the Prefect training-pipeline flow (same stages, through DVC)")
    f.add_argument("--force", action="store_true", help="re-run every stage even if its inputs are unchanged")
    f.add_argument(
        "-S",
        "--set-param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a params.yaml value for this run, as `dvc exp run -S` does (repeatable)",
    )
    return p


def _dispatch(args, params, root: Path) -> int:
    if args.command in STAGES:
        from pipeline import stages

        stages.run(args.command, params, root)
    elif args.command == "serve":
        from pipeline.serving.app import serve

        serve(params, root, args.host, args.port, args.model_uri)
    elif args.command in ("rollback", "deploy"):
        from pipeline import tracking

        store = tracking.connect(params, root)
        if args.command == "rollback":
            from pipeline.promote import rollback

            print(rollback(store, params, root, args.to)["summary"])
        else:
            from pipeline.deploy import deploy

            print(deploy(store, params, root, args.target or params.serve.target)["summary"])
    elif args.command == "summary":
        from pipeline.summary import render

        print(render(params, root))
    elif args.command in ("monitor", "shadow"):
        import json

        from pipeline import monitor

        if args.command == "monitor":
            print(monitor.summary(monitor.run(params, root)))
        else:
            print(json.dumps(monitor.shadow(params, root), indent=2))
    elif args.command == "samples":
        from pipeline.summary import write_samples

        for path in write_samples(root, Path(args.out), args.n):
            print(path)
    elif args.command == "profile":
        import shlex

        from pipeline.config import load_profile, set_param_args

        print(shlex.join(set_param_args(load_profile(args.file, root / "params.yaml"))))
    elif args.command == "stack":
        return _stack(args, params, root)
    elif args.command == "data":
        from pipeline.remote import transfer

        transfer(root, args.direction)
    elif args.command == "schedule":
        from flows.deployments import main as serve_deployments

        serve_deployments(root)
    elif args.command == "flow":
        import yaml

        from flows.pipeline import training_pipeline

        overrides = {k: yaml.safe_load(v) for k, _, v in (a.partition("=") for a in args.set_param)}
        state = training_pipeline(force=args.force, params=overrides or None, return_state=True)
        print(state.message)
        return 0 if state.is_completed() else 1
    return 0


def _stack(args, params, root: Path) -> int:
    from pipeline.stack import Stack, StackError

    stack = Stack.of(params.stack, root)
    try:
        if args.action == "up":
            for name, seconds in stack.up().items():
                print(f"started {name} in {seconds:.1f} s")
            print("\n".join(stack.env_lines()))
        elif args.action == "down":
            stopped = stack.down(args.purge)
            print("stopped " + (", ".join(stopped) or "nothing (no service of this stack was running)"))
        elif args.action == "status":
            for name, row in stack.status().items():
                state = f"running, {row['rss_mb']} MB" if row["running"] else "stopped"
                print(f"{name:<9} {state:<18} pid {row['pid']:<8} log {row['log']}")
        else:
            print("\n".join(stack.env_lines()))
    except StackError as err:
        print(f"tollgate stack {args.action}: {err}", file=sys.stderr)
        return 1
    return 0


def _tracking_failure(err: Exception) -> str | None:
    """A tracking-server failure in words that name the server, or None for any other error."""
    mlflow_exceptions = sys.modules.get("mlflow.exceptions")
    if mlflow_exceptions is None or not isinstance(err, mlflow_exceptions.MlflowException):
        return None
    import os

    uri = os.environ.get("MLFLOW_TRACKING_URI", "the local store")
    return f"the MLflow tracking server ({uri}) failed: {err.message}"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    root = Path.cwd()
    from pipeline.config import ConfigError, load_params
    from pipeline.promote import PromotionError
    from pipeline.remote import RemoteError
    from pipeline.stages import StageFailed

    try:
        return _dispatch(args, load_params(root / "params.yaml"), root)
    except ConfigError as err:
        print(f"tollgate: {err}", file=sys.stderr)
        return 2
    except (StageFailed, PromotionError, RemoteError, LookupError) as err:
        print(f"tollgate {args.command}: {err}", file=sys.stderr)
        return 1
    except Exception as err:
        message = _tracking_failure(err)
        if message is None:
            raise
        print(f"tollgate {args.command}: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
