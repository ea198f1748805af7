"""The MLflow adapter, the only code that imports mlflow: the tracking store and registry (`store`), what
runs record (`runs`), the model as MLflow serves it (`pyfunc`) and how a candidate becomes a version
(`versions`)."""
