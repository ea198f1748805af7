"""The server's routes, one module per protocol: MLflow scoring (`scoring`), the Open Inference Protocol v2
(`oip`), image files (`images`), labelled feedback (`feedback`), and operations (`admin`: metrics and
reload). Each reads the one `ServerContext` the app holds."""
