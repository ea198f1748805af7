"""register: a gated candidate is logged in MLflow's model format, proven to serve (infra validation),
then registered with its lineage, a description and the gate, and pointed at by @challenger.

Infra validation serves the packaged candidate from a fresh process, exactly as the serving target loads
models, and checks with a real request that it predicts as evaluation did (`pipeline.release.verify`).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from pipeline.core import experiment, failpoints, paths
from pipeline.core.config import Params
from pipeline.core.files import load_json
from pipeline.data.prepared import read_manifest
from pipeline.evaluation.runtimes import RuntimeRow
from pipeline.evaluation.runtimes import markdown as runtime_table
from pipeline.evaluation.verdict import Verdict
from pipeline.registry import versions
from pipeline.registry.runs import git_state
from pipeline.registry.store import CHALLENGER, Store, model_uri
from pipeline.release import verify
from pipeline.release.results import Registration
from pipeline.release.runtimes import stage as stage_runtimes
from pipeline.serving import MODEL_URI_FROM_STDIN
from pipeline.serving.client import Server, free_port
from pipeline.training import runtimes
from pipeline.training.model_folder import META, backbone_name

SERVER = "pipeline.serving.app"  # what infra validation starts in a fresh process


@dataclass(frozen=True)
class FreshServer:
    """The process infra validation serves the candidate from, started before the candidate is logged."""

    proc: subprocess.Popen
    port: int
    log: IO[str]


@contextlib.contextmanager
def fresh_server(root: Path) -> Iterator[FreshServer]:
    """A serving process of its own, waiting for the URI of the model to load (`--model-uri -`): its start
    (torch, the web stack: ~2.5 s) overlaps the candidate's packaging. Stopped on the way out."""
    port = free_port()
    cmd = [sys.executable, "-m", SERVER, "--model-uri", MODEL_URI_FROM_STDIN, "--port", str(port)]
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(
            cmd, cwd=root, stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT, text=True
        )
        try:
            yield FreshServer(proc, port, log)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
            proc.stdin.close()


def infra_validate(params: Params, root: Path, fresh: FreshServer, location: str) -> str | None:
    """Serve the packaged candidate at `location` from the fresh process, send it a real request, and
    compare with evaluation. Returns None when it passes, else the reason."""
    smoke = verify.from_evaluation(root, params.promote.smoke_images)
    server = Server(f"http://127.0.0.1:{fresh.port}")
    try:
        fresh.proc.stdin.write(location + "\n")
        fresh.proc.stdin.close()
        server.wait_ready(params.promote.start_timeout_s, alive=lambda: fresh.proc.poll() is None)
        verify.predicts_like(verify.scoring(server, params.promote.timeout_s), smoke, "served")
    except verify.VerificationFailed as err:
        return str(err)
    except (OSError, ValueError, TimeoutError) as err:
        fresh.log.seek(0)
        tail = " | ".join(fresh.log.read().strip().splitlines()[-3:])
        return f"candidate did not serve: {err}" + (f" ({tail})" if tail else "")
    return None


def _backbone(meta: dict) -> str:
    """The network and where its starting weights came from, in words."""
    name = backbone_name(meta)
    start = meta.get("pretrained", {})
    if start.get("source", "none") == "none":
        return f"{name} (from scratch)"
    return f"{name} (fine-tuned from {start['source']} weights {start['weights']})"


def model_description(meta: dict, source: str) -> str:
    """What the registered model is, for its page in the MLflow registry (markdown)."""
    h, w, c = meta["input_shape"]
    classes = meta["classes"]
    shown = ", ".join(classes[:20]) + (f" and {len(classes) - 20} more" if len(classes) > 20 else "")
    return (
        f"Image classifier over {len(classes)} classes ({shown}), trained by tollgate on `{source}` data.\n\n"
        f"**Network**: {_backbone(meta)}.\n\n"
        f"**Input**: uint8 pixels of shape (N, {h}, {w}, {c}) "
        f"({'grey' if c == 1 else 'RGB'}; images of any size are resized as in training). "
        "Normalisation is inside the model. "
        "**Output**: class probabilities (N, number of classes), in the class order above.\n\n"
        "**How versions get here**: only through the pipeline. The data passes validation (Great "
        "Expectations), the trained candidate passes the gate (absolute bounds and no regression against "
        "@champion re-scored on the same test split), then infra validation (the packaged model served from "
        "a fresh process must predict as evaluation did). Aliases: `@challenger` is the latest passing "
        "candidate, `@champion` is what serves, `@previous` the champion before it. A version's tags carry "
        "its lineage (git commit, data version, params hash) and its description the gate table."
    )


class Rejected(Exception):
    """The candidate fails infra validation; the message says why."""


Runtimes = tuple[str, list[dict]]  # the runtime that serves a version, and its artefacts' gate rows


def _new_version(store: Store, params: Params, root: Path, run_id: str) -> tuple[str, Runtimes]:
    """Log the candidate with the serving artefacts that passed their gate, serve it from a fresh process,
    register it; its version and runtimes. Raises Rejected when it cannot be packaged or does not serve
    like evaluation predicted, and a tracking-store failure as it is (the stage fails and can be
    retried)."""
    example = verify.smoke_images(root, load_json(root / paths.MODEL_DIR / META)["input_shape"], 2)
    with fresh_server(root) as fresh, tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        serves, rows = stage_runtimes(params, root, model_dir)
        try:
            logged = versions.log_candidate(store, run_id, model_dir, example)
        except versions.PackagingError as err:
            raise Rejected(f"infra validation failed: {err}") from None
        failure = infra_validate(params, root, fresh, logged.location)
    if failure is not None:
        raise Rejected(f"infra validation failed: {failure} (served on {serves})")
    failpoints.reach("register:logged")
    version = versions.register(logged, params.registry.model_name)
    failpoints.reach("register:version-created")
    return version, (serves, [r.model_dump(mode="json") for r in rows])


def _runtimes_of(store: Store, name: str, version: str) -> Runtimes:
    """The runtime that serves a registered version and its artefacts' gate rows, as it was logged (read
    back when a re-run completes a version registered before)."""

    def read(folder: Path) -> Runtimes:
        path = folder / runtimes.CHOICE
        choice = load_json(path) if path.exists() else {"serves": runtimes.TORCH, "rows": []}
        return choice["serves"], choice["rows"]

    return store.read_model_dir(model_uri(name, version), read)


def _experiment_tags(root: Path, exp: experiment.Experiment) -> dict[str, str]:
    diff = experiment.params_diff(root, exp.baseline)
    return {
        "experiment": exp.name,
        "experiment_baseline": exp.baseline,
        "experiment_params": json.dumps(diff, sort_keys=True),
    }


def _describe(store: Store, params: Params, root: Path, version: str, verdict: Verdict,
              serves: Runtimes) -> str:  # fmt: skip
    """The version's lineage tags, gate table and serving runtime, the model's description, and its alias:
    @challenger, or `@exp-<name>` for a DVC experiment's candidate (an experiment is never a candidate for
    production until someone promotes it on purpose). Returns the alias."""
    name = params.registry.model_name
    metrics = load_json(root / paths.EVAL_METRICS)
    meta = load_json(root / paths.MODEL_DIR / META)
    commit, dirty = git_state(root)
    tags = {
        "git_commit": commit,
        "git_dirty": str(dirty).lower(),
        "data_version": meta["data_version"],
        "params_hash": meta["params_hash"],
        "gate": verdict.summary(),
        "infra_validation": "passed",
        "accuracy": f"{metrics['accuracy']:.4f}",
        "macro_f1": f"{metrics['macro_f1']:.4f}",
        "device": load_json(root / paths.TRAIN_REPORT)["device"],
        "runtime": serves[0],
    }
    exp = experiment.current()
    if exp is not None:
        tags.update(_experiment_tags(root, exp))
    if verdict.paired is not None:
        tags["paired_test"] = verdict.paired.sentence()
    # The model card (evaluate wrote it from the figures it measured) is what the registry UI shows.
    text = (
        (root / paths.MODEL_CARD)
        .read_text()
        .replace(
            f"Gate: **{verdict.headline()}**.", f"Gate: **{verdict.headline()}**, infra validation passed.", 1
        )
    )
    if serves[1]:
        rows = [RuntimeRow.model_validate(r) for r in serves[1]]
        text += "\n\n" + runtime_table(rows, serves[0]) + "\n"
    about = model_description(meta, read_manifest(root / paths.PREPARED_DIR)["source"])
    versions.describe(store, name, version, tags, text, about)
    alias = exp.alias if exp is not None else CHALLENGER
    store.point(name, alias, version)
    return alias


def register(store: Store, params: Params, root: Path, verdict: Verdict) -> Registration:
    """Register a passing candidate (once per MLflow run) that also passes infra validation, and point
    @challenger at it; record a rejected one's reasons on its run. Run again after a failure at any point
    (the tracking server gone between logging and registering, say), it completes the same version's tags
    and aliases."""
    run_id, name = verdict.run_id, params.registry.model_name

    def reject(reasons: list[str]) -> Registration:
        store.tag_run(run_id, "tollgate.rejected", "; ".join(reasons))
        return Registration(registered=False, run_id=run_id, reasons=reasons)

    if not verdict.passed:
        return reject(verdict.reasons)
    version = versions.version_of_run(store, name, run_id)
    existed = version is not None
    if existed:
        serves = _runtimes_of(store, name, version)
    else:
        try:
            version, serves = _new_version(store, params, root, run_id)
        except Rejected as err:
            return reject([str(err)])
    alias = _describe(store, params, root, version, verdict, serves)
    exp = experiment.current()
    return Registration(
        registered=True,
        run_id=run_id,
        name=name,
        version=version,
        model_uri=model_uri(name, version),
        alias=alias,
        experiment=exp.name if exp else None,
        runtime=serves[0],
        runtimes=serves[1],
        existed=existed,
    )
