"""The serving target (`tollgate serve`) and its client.

`app` routes and process, `protocols` request parsing, `batching` the model slot and dynamic batching,
`metrics` Prometheus, `transport` connection deadlines, `state` the server's published address, `client`
what promotion and infra validation use to reach a server (no web framework imported).
"""


def add_arguments(parser) -> None:
    """The options of `tollgate serve`, also taken by `python -m pipeline.serving.app`."""
    parser.add_argument("--host", help="bind address (default: serve.host in params.yaml)")
    parser.add_argument(
        "--port", type=int, help="port (default: serve.port in params.yaml; 0 = any free one)"
    )
    parser.add_argument(
        "--model-uri",
        help="serve this one MLflow model (models:/name/version or a logged model's artifact URI) "
        "instead of following @champion",
    )
