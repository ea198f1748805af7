"""`tollgate`: the DVC stages, the server, the summary and the Prefect flow behind one command. The CLI is
the composition root: the one place that wires layers together (the server with the promotion lock
around it, the flows of `flows/`)."""

from __future__ import annotations

import argparse
import atexit
import contextlib
import os
import sys
from pathlib import Path

from pipeline.core.config import STAGES, Params


def _parser() -> argparse.ArgumentParser:
    from pipeline.release.targets.catalog import TARGETS
    from pipeline.serving import add_arguments

    p = argparse.ArgumentParser(prog="tollgate", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    stages = {
        stage: sub.add_parser(stage, help=f"run the {stage} stage (what dvc.yaml calls)") for stage in STAGES
    }
    stages["promote"].add_argument(
        "--version",
        help="instead of the stage: make this registered version @champion on purpose (a DVC experiment's, "
        "say), verified like any promotion (a canary rollout under promote.strategy: canary); "
        "reports/promotion.json is left to the stage",
    )
    stages["promote"].add_argument(
        "--resume",
        action="store_true",
        help="take over a canary rollout whose promoting process died, and finish it (or roll it back)",
    )
    ca = sub.add_parser("canary", help="the canary rollout in progress: its step and the live analysis")
    ca.add_argument("action", choices=["status"])
    add_arguments(sub.add_parser("serve", help="HTTP inference server on models:/<name>@champion"))
    rb = sub.add_parser("rollback", help="make an earlier version @champion again, verified like a promotion")
    rb.add_argument("--to", help="version to restore (default: the one behind @previous)")
    d = sub.add_parser("deploy", help="hand @champion to a serving target (default: promote.target)")
    d.add_argument("--target", choices=sorted(TARGETS))
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


def _serve(args, params: Params, root: Path) -> int:
    from pipeline.release.rollout import startup
    from pipeline.serving.app import serve

    serve(params, root, args.host, args.port, args.model_uri, lambda reads: startup(reads, params, root))
    return 0


def _canary(args, params: Params, root: Path) -> int:
    from pipeline.registry.store import connect
    from pipeline.release.rollout import status

    print(status(connect(params, root), params, root))
    return 0


def _rollback(args, params: Params, root: Path) -> int:
    from pipeline.registry.store import connect
    from pipeline.release.promote import rollback

    print(rollback(connect(params, root), params, root, args.to).summary)
    return 0


def _deploy(args, params: Params, root: Path) -> int:
    from pipeline.registry.store import connect
    from pipeline.release.promote import deploy

    done = deploy(connect(params, root), params, root, args.target or params.promote.target)
    print(done.summary or "nothing to hand over: tollgate serve follows @champion (promotion reloads it)")
    return 0


def _summary(args, params: Params, root: Path) -> int:
    from pipeline.cli.summary import render

    print(render(params, root))
    return 0


def _monitor(args, params: Params, root: Path) -> int:
    from pipeline.monitoring import report

    print(report.summary(report.run(params, root)))
    return 0


def _shadow(args, params: Params, root: Path) -> int:
    import json

    from pipeline.monitoring import report

    print(json.dumps(report.shadow(params, root), indent=2))
    return 0


def _samples(args, params: Params, root: Path) -> int:
    from pipeline.cli.summary import write_samples

    for path in write_samples(root, Path(args.out), args.n):
        print(path)
    return 0


def _profile(args, params: Params, root: Path) -> int:
    import shlex

    from pipeline.core.config import load_profile, set_param_args

    print(shlex.join(set_param_args(load_profile(args.file, root / "params.yaml"))))
    return 0


def _data(args, params: Params, root: Path) -> int:
    from pipeline.stack.remote import transfer

    transfer(root, args.direction)
    return 0


def _schedule(args, params: Params, root: Path) -> int:
    from flows.deployments import main as serve_deployments

    serve_deployments(root)
    return 0


def _flow(args, params: Params, root: Path) -> int:
    import yaml

    from flows.pipeline import training_pipeline

    overrides = {k: yaml.safe_load(v) for k, _, v in (a.partition("=") for a in args.set_param)}
    state = training_pipeline(force=args.force, params=overrides or None, return_state=True)
    print(state.message)
    return 0 if state.is_completed() else 1


def _stack(args, params: Params, root: Path) -> int:
    from pipeline.stack.services import Stack, StackError

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


def _promote(args, params: Params, root: Path) -> int:
    """`tollgate promote --version N` or `--resume`: outside the stage, reports/promotion.json too."""
    from pipeline.core import paths
    from pipeline.registry.store import connect
    from pipeline.release.promote import PromotionError, promote_version
    from pipeline.release.rollout import release_for, resume

    store = connect(params, root)
    if args.resume:
        result = resume(store, params, root)
        result.write(root / paths.PROMOTION)
    else:
        result = promote_version(store, params, root, args.version, release_for(params))
    if not result.promoted:
        raise PromotionError(result.line())
    print(result.summary)
    return 0


def _stage(args, params: Params, root: Path) -> int:
    if args.command == "promote" and (args.version or args.resume):
        return _promote(args, params, root)
    from pipeline import stages

    if args.command == "train":  # before the stage loads torch, whose OpenMP reads the policy once
        from pipeline.training import waits

        t = params.train
        stages.log(waits.apply(t.wait_policy, t.threads, t.nproc_per_node))
    stages.run(args.command, params, root)
    return 0


COMMANDS = {
    **dict.fromkeys(STAGES, _stage),
    "serve": _serve,
    "canary": _canary,
    "rollback": _rollback,
    "deploy": _deploy,
    "summary": _summary,
    "monitor": _monitor,
    "shadow": _shadow,
    "samples": _samples,
    "profile": _profile,
    "data": _data,
    "schedule": _schedule,
    "flow": _flow,
    "stack": _stack,
}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    root = Path.cwd()
    from pipeline.core.config import ConfigError, load_params
    from pipeline.core.errors import Failure
    from pipeline.registry.store import tracking_failure

    try:
        return COMMANDS[args.command](args, load_params(root / "params.yaml"), root)
    except ConfigError as err:
        print(f"tollgate: {err}", file=sys.stderr)
        return 2
    except (Failure, LookupError) as err:
        print(f"tollgate {args.command}: {err}", file=sys.stderr)
        return 1
    except Exception as err:
        message = tracking_failure(err)
        if message is None:
            raise
        print(f"tollgate {args.command}: {message}", file=sys.stderr)
        return 1


def entry() -> None:
    """The console script: `main`, then an exit that skips the interpreter's teardown. Freeing torch's and
    MLflow's modules one by one costs a stage process ~1.5 s after its last line (`tollgate evaluate`,
    measured), once per stage of every `dvc repro`; the operating system frees them at once. What an exit
    owes still happens first: Python joins non-daemon threads, then runs every atexit handler (MLflow's
    flushes, logging's) before this one, which is registered before any of theirs."""
    returned: list[int] = []
    atexit.register(_exit_skipping_teardown, returned)
    returned.append(main())
    sys.exit(returned[0])


def _exit_skipping_teardown(returned: list[int]) -> None:
    if not returned:  # an exception or a signal: the usual exit, with its status
        return
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe or stream: nothing left to flush
            stream.flush()
    os._exit(returned[0])


if __name__ == "__main__":
    entry()
