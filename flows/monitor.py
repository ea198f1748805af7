"""The `drift-check` flow (deployed hourly by prefect.yaml): run the monitor on the newest live samples and,
when it says retrain (an estimated accuracy drop beyond `monitor.max_accuracy_drop`, or a check listed in
`monitor.blocking_checks`; a significant shift alone only reports), notify and start the retraining
deployment (`monitor.retrain_deployment`, which
trains with the feedback users gave), whose own gates decide whether anything is promoted.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from prefect.states import Completed

from pipeline.core.config import load_params
from pipeline.core.paths import PARAMS


@flow(name="drift-check", log_prints=True)
def drift_check(root: str = "."):
    from pipeline.monitoring import report as monitor

    root_path = Path(root).resolve()
    params = load_params(root_path / PARAMS)
    report = monitor.run(params, root_path)
    print(monitor.summary(report))
    if not report["retrain"]:
        if report["drift"] is None:
            return Completed(message="no verdict: too few samples")
        shift = "drift without an accuracy cost" if report["drift"] else "no drift"
        return Completed(message=f"{shift}: {report['retrain_reason']}; not retraining")
    from prefect.deployments import run_deployment

    from pipeline.core.notify import notify

    why = report["retrain_reason"]
    # timeout=0: start it and return; the retraining run has its own lock, timeouts and notifications.
    run = run_deployment(params.monitor.retrain_deployment, timeout=0, tags=["drift"], as_subflow=False)
    text = (
        f"tollgate: live traffic of {report['model']} v{report['version']} needs retraining ({why}); "
        f"started {params.monitor.retrain_deployment} (flow run {run.id})"
    )
    notify(params.flow, text)
    return Completed(message=f"retrain ({why}): started retraining flow run {run.id}")
