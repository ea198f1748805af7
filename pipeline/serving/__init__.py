"""The serving target (`tollgate serve`) and its client.

`app` assembles the server from `routes` over one `context`; `protocols` parses requests, `batching` holds
the model slot and dynamic batches, `follow` keeps it on the alias, `prometheus` counts, `transport` sets
connection deadlines, `sampling` and `shadow` watch live traffic off the request path, `state` publishes
the server's address, and `client` is what promotion and infra validation use to reach a server (no web
framework imported).
"""

MODEL_URI_FROM_STDIN = "-"  # --model-uri -: the URI arrives on standard input, once the process has loaded


def add_arguments(parser) -> None:
    """The options of `tollgate serve`, also taken by `python -m pipeline.serving.app`."""
    parser.add_argument("--host", help="bind address (default: serve.host in params.yaml)")
    parser.add_argument(
        "--port", type=int, help="port (default: serve.port in params.yaml; 0 = any free one)"
    )
    parser.add_argument(
        "--model-uri",
        help="serve this one MLflow model (models:/name/version or a logged model's artifact URI) "
        "instead of following @champion; - reads it from standard input",
    )
