"""The server's request handling in-process (FastAPI's TestClient, and the parsers called directly): every
protocol, every way a request can be wrong, in seconds. tests/system/test_serve.py runs the same server as
a real process over real HTTP."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest

from pipeline.core.config import load_params
from pipeline.serving import protocols
from pipeline.serving.protocols import Refused
from tests.support import ROOT

NAME = "tollgate-classifier"
SHAPE = [8, 8, 1]
JSON = {"Content-Type": "application/json"}
TOKEN = "s3cret-token"


def _app(**serve):
    """An app serving an untrained digits-shaped model; `serve` overrides params.yaml's serve section."""
    from pipeline.serving.app import create_app
    from pipeline.serving.batching import ModelSlot, Served
    from pipeline.training.model import build

    params = load_params(ROOT / "params.yaml")
    params = params.model_copy(update={"serve": params.serve.model_copy(update=serve)})
    meta = {
        "backbone": "small_cnn",
        "width": 4,
        "input_shape": SHAPE,
        "classes": [str(d) for d in range(10)],
        "normalization": {"mean": [0.5], "std": [0.25]},
    }
    slot = ModelSlot(None, NAME)
    slot.current = Served("7", build(meta).eval(), meta)
    return create_app(params, slot, TOKEN)


@pytest.fixture(scope="module")
def client():
    from fastapi.testclient import TestClient

    with TestClient(_app()) as c:
        yield c


def _json(obj) -> bytes:
    return json.dumps(obj).encode()


def _png(size=(8, 8), mode="L") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, size, 128).save(buf, format="PNG")
    return buf.getvalue()


def _oip(datatype: str, data: list, shape=(1, 8, 8, 1)) -> bytes:
    return _json({"inputs": [{"name": "pixels", "shape": list(shape), "datatype": datatype, "data": data}]})


def _multipart(payload: bytes, boundary: str = "b0undary") -> tuple[bytes, dict]:
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + payload
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def test_every_protocol_answers_with_the_served_version(client):
    x = np.zeros((3, *SHAPE)).tolist()
    out = client.post("/invocations", content=_json({"inputs": x}), headers=JSON).json()
    assert out["version"] == "7" and np.asarray(out["predictions"]).shape == (3, 10)
    out = client.post(f"/v2/models/{NAME}/infer", content=_oip("UINT8", [0] * 64), headers=JSON).json()
    assert out["model_version"] == "7" and out["outputs"][0]["shape"] == [1, 10]
    out = client.post("/predict?top_k=2", content=_png((30, 20), "RGB")).json()
    assert out["version"] == "7" and len(out["predictions"]) == 2
    body, headers = _multipart(_png())
    assert client.post("/predict", content=body, headers=headers).status_code == 200
    assert client.get(f"/v2/models/{NAME}").json()["versions"] == ["7"]


BAD = [
    ("/invocations", b"{not json", JSON, 400, "valid JSON"),
    ("/invocations", _json({"inputs": [[1, 2, 3]]}), JSON, 400, "shape"),
    ("/invocations", _json({"rows": []}), JSON, 400, '"inputs"'),
    ("/invocations", _json({"inputs": [[[["a"]] * 8] * 8]}), JSON, 400, "numbers"),
    (
        "/invocations",
        _json({"inputs": [[[["1"]] * 8] * 8]}),
        JSON,
        400,
        "numbers",
    ),  # strings that look numeric
    ("/invocations", _json({"inputs": [[[[True]] * 8] * 8]}), JSON, 400, "numbers"),
    ("/invocations", _json({"inputs": [[[[None]] * 8] * 8]}), JSON, 400, "numbers"),
    ("/invocations", _json({"inputs": [[[[1e300]] * 8] * 8]}), JSON, 400, "finite"),
    ("/invocations", json.dumps({"inputs": [[[[math.nan]] * 8] * 8]}).encode(), JSON, 400, "NaN"),
    ("/invocations", _json({"inputs": [[[[1]] * 8] * 8]}), {"Content-Type": "text/plain"}, 415, "json"),
    ("/invocations", b"", JSON, 400, "empty"),
    ("/predict", b"", {"Content-Type": "image/png"}, 400, "empty"),
    ("/predict", b"GIF89a not really", {"Content-Type": "image/png"}, 400, "PNG or JPEG"),
    ("/predict", b"{}", JSON, 415, "PNG/JPEG"),
    (
        "/predict",
        _multipart(b"x")[0].replace(b"filename", b"nofile"),
        _multipart(b"")[1],
        400,
        "no file part",
    ),
    (f"/v2/models/{NAME}/infer", _oip("FP32", [1, 2]), JSON, 400, "data matching shape"),
    (f"/v2/models/{NAME}/infer", _oip("BYTES", [1] * 64), JSON, 400, "datatype"),
    (f"/v2/models/{NAME}/infer", _oip("FP16", [1e5] * 64), JSON, 400, "finite"),
    (f"/v2/models/{NAME}/infer", _oip("UINT8", [256] * 64), JSON, 400, "integers in 0..255"),
    (f"/v2/models/{NAME}/infer", _oip("UINT8", [-1] * 64), JSON, 400, "integers in 0..255"),
    (f"/v2/models/{NAME}/infer", _oip("INT8", [200] * 64), JSON, 400, "integers in -128..127"),
    (f"/v2/models/{NAME}/infer", _oip("UINT8", [1.5] * 64), JSON, 400, "integers in 0..255"),
    (f"/v2/models/{NAME}/infer", _oip("FP32", ["1"] * 64), JSON, 400, "numbers"),
    ("/v2/models/other/infer", _oip("FP32", [0] * 64), JSON, 404, "unknown model"),
    ("/admin/reload", b"", {}, 401, "token"),
    ("/admin/reload", b"", {"Authorization": "Bearer wrong"}, 401, "token"),
    ("/admin/reload", b"", {"Authorization": "Bearer tökén".encode()}, 401, "token"),  # non-ASCII
]


@pytest.mark.parametrize(
    ("path", "body", "headers", "status", "says"), BAD, ids=[f"{p} {s} {w}" for p, _, _, s, w in BAD]
)
def test_bad_requests_get_a_4xx_saying_what_was_expected(client, path, body, headers, status, says):
    resp = client.post(path, content=body, headers=headers)
    assert resp.status_code == status, resp.text
    assert says.lower() in _message(path, resp).lower()


def _message(path: str, resp) -> str:
    """The error text where each protocol's clients look for it: `error` on the Open Inference Protocol's
    routes (Triton's and KServe's clients read that key), `detail` (and MLflow's `message`) elsewhere."""
    body = resp.json()
    if path.startswith("/v2"):
        assert set(body) == {"error"}, body
        return body["error"]
    return body["detail"]


def _binary(payload: dict, tensor: np.ndarray | None = None) -> tuple[bytes, dict]:
    """A request with the binary tensor data extension, as Triton's client sends it: no Content-Type."""
    head = _json(payload)
    return head + (tensor.tobytes() if tensor is not None else b""), {
        "Inference-Header-Content-Length": str(len(head))
    }


def test_oip_takes_json_without_a_content_type_and_binary_tensors_both_ways(client):
    x = np.random.default_rng(0).integers(0, 256, (2, *SHAPE), dtype=np.uint8)
    tensor = {"name": "pixels", "shape": [2, *SHAPE], "datatype": "UINT8"}
    plain = client.post(
        f"/v2/models/{NAME}/infer", content=_json({"inputs": [{**tensor, "data": x.ravel().tolist()}]})
    )
    assert plain.status_code == 200 and plain.headers["content-type"] == "application/json"
    expected = np.asarray(plain.json()["outputs"][0]["data"], dtype=np.float32).reshape(2, 10)
    scored = client.post("/invocations", content=_json({"inputs": x.tolist()}), headers=JSON).json()
    assert np.allclose(expected, scored["predictions"], atol=1e-6)

    body, headers = _binary(
        {
            "inputs": [{**tensor, "parameters": {"binary_data_size": x.nbytes}}],
            "parameters": {"binary_data_output": True},
        },
        x,
    )
    resp = client.post(f"/v2/models/{NAME}/versions/7/infer", content=body, headers=headers)
    assert resp.status_code == 200, resp.text
    length = int(resp.headers["inference-header-content-length"])
    head = json.loads(resp.content[:length])
    (output,) = head["outputs"]
    assert output["parameters"]["binary_data_size"] == 2 * 10 * 4 and "data" not in output
    got = np.frombuffer(resp.content[length:], dtype="<f4").reshape(output["shape"])
    assert np.array_equal(got, expected)


def test_oip_binary_requests_that_do_not_add_up_are_refused_with_an_error_body(client):
    tensor = {"name": "pixels", "shape": [1, *SHAPE], "datatype": "UINT8"}
    short = np.zeros(63, dtype=np.uint8)
    for payload, raw, says in [
        ({"inputs": [{**tensor, "parameters": {"binary_data_size": 64}}]}, short, "does not fit"),
        ({"inputs": [{**tensor, "parameters": {"binary_data_size": 63}}]}, short, "needs 64"),
        ({"inputs": [{**tensor, "data": [0] * 64}], "outputs": [{"name": "logits"}]}, None, "one output"),
    ]:
        body, headers = _binary(payload, raw)
        resp = client.post(f"/v2/models/{NAME}/infer", content=body, headers=headers)
        assert resp.status_code == 400 and says in _message("/v2", resp)
    resp = client.post(
        f"/v2/models/{NAME}/infer", content=b"{}", headers={"Inference-Header-Content-Length": "99"}
    )
    assert resp.status_code == 400 and "does not fit" in _message("/v2", resp)


def test_oip_versioned_routes_serve_the_served_version_only(client):
    assert client.get(f"/v2/models/{NAME}/versions/7/ready").json()["ready"] is True
    assert client.get(f"/v2/models/{NAME}/versions/7").json()["versions"] == ["7"]
    for path in (f"/v2/models/{NAME}/versions/1/ready", f"/v2/models/{NAME}/versions/1"):
        resp = client.get(path)
        assert resp.status_code == 404 and "serves v7" in _message(path, resp)
    resp = client.post(f"/v2/models/{NAME}/versions/1/infer", content=_oip("UINT8", [0] * 64))
    assert resp.status_code == 404 and "version '1' is not served" in _message("/v2", resp)
    assert "binary_tensor_data" in client.get("/v2").json()["extensions"]
    resp = client.get("/v2/no/such/route")
    assert resp.status_code == 404 and set(resp.json()) == {"error"}


def test_mlflow_health_routes_answer_like_mlflows_scoring_server(client):
    from importlib.metadata import version

    for path in ("/ping", "/health"):
        resp = client.get(path)
        assert resp.status_code == 200 and resp.text == "\n"
    assert client.get("/version").text == version("mlflow")


def test_too_many_images_are_refused_before_conversion():
    from fastapi.testclient import TestClient

    with TestClient(_app(max_request_images=4)) as c:
        x = np.zeros((5, *SHAPE), dtype=int).tolist()
        resp = c.post("/invocations", content=_json({"inputs": x}), headers=JSON)
        assert resp.status_code == 413 and "5 images in one request; at most 4" in resp.json()["detail"]
        resp = c.post(
            f"/v2/models/{NAME}/infer", content=_oip("UINT8", [0] * 320, (5, 8, 8, 1)), headers=JSON
        )
        assert resp.status_code == 413
        assert c.post("/invocations", content=_json({"inputs": x[:4]}), headers=JSON).status_code == 200


def test_large_scoring_bodies_are_counted_before_they_are_parsed():
    # The bracket count must agree with the parse: refuse exactly what the parse would, accept the rest.
    from pipeline.serving.protocols import Refused, cap_before_parsing

    for n, refused in ((4, False), (5, True)):
        for key in ("inputs", "instances"):
            body = _json({key: np.zeros((n, *SHAPE), dtype=int).tolist()})
            try:
                cap_before_parsing(body, 4)
                outcome = False
            except Refused as err:
                outcome = err.status == 413 and f"{n} images in one request" in err.detail
            assert outcome is refused, (n, key)


def test_a_multipart_upload_counts_against_the_body_limit():
    from fastapi.testclient import TestClient

    big = b"\0" * (2 * 1024 * 1024)
    body, headers = _multipart(big)
    with TestClient(_app(max_body_mb=1.0)) as c:
        assert c.post("/predict", content=body, headers=headers).status_code == 413

        def chunked():  # no Content-Length: counted as it arrives
            for i in range(0, len(body), 65536):
                yield body[i : i + 65536]

        resp = c.post("/predict", content=chunked(), headers=headers)
        assert resp.status_code == 413 and "larger than" in resp.json()["detail"]


def test_json_parsers_keep_integers_exact_and_refuse_ragged_arrays():
    x = protocols.pixels_from_json({"instances": [[[[255]] * 8] * 8]}, SHAPE, 10)
    assert x.dtype == np.float32 and x.shape == (1, 8, 8, 1) and x.max() == 255
    with pytest.raises(Refused) as err:
        protocols.pixels_from_json({"inputs": [[[[1]] * 8] * 8, [[1]]]}, SHAPE, 10)
    assert err.value.status == 400
    with pytest.raises(Refused) as err:
        protocols.pixels_from_image(_png((5000, 5000)), {"input_shape": SHAPE}, 1000)
    assert err.value.status == 413 and "5000x5000" in err.value.detail


def test_the_api_reference_pages_are_served_only_when_asked():
    from fastapi.testclient import TestClient

    with TestClient(_app()) as c:
        assert [c.get(p).status_code for p in ("/docs", "/redoc", "/openapi.json")] == [404, 404, 404]
    with TestClient(_app(api_docs=True)) as c:
        assert [c.get(p).status_code for p in ("/docs", "/redoc", "/openapi.json")] == [200, 200, 200]


def test_feedback_has_a_token_of_its_own_and_a_size_bound(tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    from pipeline.serving.app import create_app

    monkeypatch.delenv("TOLLGATE_FEEDBACK_TOKEN", raising=False)
    params = load_params(ROOT / "params.yaml")
    monitor = params.monitor.model_copy(update={"sample_fraction": 1.0, "feedback_max_mb": 0.0001})
    params = params.model_copy(update={"monitor": monitor})
    app = _app()
    slot = app.state.ctx.slot
    with TestClient(create_app(params, slot, TOKEN, root=tmp_path)) as c:
        ctx = c.app.state.ctx
        assert ctx.feedback_token and ctx.feedback_token != TOKEN  # the admin token labels nothing
        out = c.post("/invocations", content=_json({"inputs": np.zeros((1, *SHAPE)).tolist()}), headers=JSON)
        rid = out.json()["request_id"]
        label = {"request_id": rid, "label": "3"}
        admin = c.post(
            "/feedback", content=_json(label), headers={**JSON, "Authorization": f"Bearer {TOKEN}"}
        )
        assert admin.status_code == 401
        auth = {**JSON, "Authorization": f"Bearer {ctx.feedback_token}"}
        assert c.post("/feedback", content=_json(label), headers=auth).status_code == 201
        full = c.post("/feedback", content=_json(label), headers=auth)  # one shard is over 0.0001 MB
        assert full.status_code == 507 and "monitor.feedback_max_mb" in full.json()["detail"]


def test_smoke_requests_of_photos_stay_under_the_servers_body_limit():
    from pipeline.release.verify import request_batches

    limit = load_params(ROOT / "params.yaml").serve.max_body_mb * 1e6
    x = np.full((16, 224, 224, 3), 255, np.uint8)  # promote.smoke_images photos at a backbone's size
    x[:, 0, 0, 0] = np.arange(16)

    def size(part) -> int:
        return len(json.dumps({"inputs": part.astype(float).tolist()}))

    assert size(x) > limit  # one request would be refused while it arrives
    parts = request_batches(x)
    assert all(size(p) <= limit for p in parts)
    np.testing.assert_array_equal(np.concatenate(parts), x)
    assert len(request_batches(np.zeros((16, 8, 8, 1), np.uint8))) == 1  # digits: one request, as before


def test_a_server_told_to_read_its_model_uri_from_stdin_stops_at_end_of_input_saying_so():
    """Infra validation starts the server before the candidate is logged (`--model-uri -`); if the URI never
    comes (registration failed, or died), the process ends by itself, naming why, instead of waiting."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "pipeline.serving.app", "--model-uri", "-", "--port", "0"]
    proc = subprocess.run(cmd, cwd=ROOT, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "--model-uri - and no URI on standard input" in proc.stderr
