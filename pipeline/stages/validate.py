"""validate: the Great Expectations suite over the prepared data (pipeline/data/expectations.py); a refusal
stops the pipeline here, with its report in MLflow."""

from __future__ import annotations

from pathlib import Path

from pipeline.core import paths
from pipeline.core.config import Params
from pipeline.core.files import atomic_dir, write_json
from pipeline.data.expectations import DOCS_INDEX, run_suite
from pipeline.stages import StageFailed, log, work


def run(params: Params, root: Path) -> dict:
    with atomic_dir(root / paths.DATA_DOCS) as docs, work():
        report = run_suite(root / paths.PREPARED_DIR, params.validate_, docs)
    n = len(report["checks"])
    for warning in report["warnings"]:
        log(f"data validation warning (not blocking): {warning}")
    if report["passed"]:
        # A passing report goes to MLflow with the training run: validate stays free of mlflow's import.
        write_json(root / paths.VALIDATION_REPORT, report)
        log(f"data validation passed: {n} checks ({len(report['warnings'])} warnings)")
        return report
    from pipeline.registry import runs, store

    report["mlflow_run_id"] = runs.log_refused_data(
        store.connect(params, root), report, root / paths.DATA_DOCS
    )
    write_json(root / paths.VALIDATION_REPORT, report)
    lines = "\n".join(f"  - {f}" for f in report["failures"])
    raise StageFailed(
        f"data validation failed ({len(report['failures'])} of {n} checks); nothing downstream runs:\n"
        f"{lines}\nreports: {paths.VALIDATION_REPORT}, {paths.DATA_DOCS}/{DOCS_INDEX}, "
        f"MLflow run {report['mlflow_run_id']}"
    )
