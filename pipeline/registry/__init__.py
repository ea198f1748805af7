"""The MLflow adapter, the only code that imports mlflow: the tracking store and registry (`store`), what
runs record (`runs`), the model as MLflow serves it (`pyfunc`) and how a candidate becomes a version
(`versions`)."""

import os

# MLflow sends usage telemetry unless told otherwise, and takes DO_NOT_TRACK only in its "true" spelling
# (the Makefile's 1, which Prefect and the Hugging Face hub honour, leaves it on). Off before any module
# here imports mlflow, and in the processes it starts; MLFLOW_DISABLE_TELEMETRY=false turns it back on.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
