"""The serving targets, one object each behind one interface (`base.Target`): tollgate's own server
(`local`), MLflow's scoring server (`mlflow_server`), KServe (`kserve`) and TorchServe (`torchserve`, with
the handler its archives carry); `catalog` is the one place that turns `promote.target` into one of them."""
