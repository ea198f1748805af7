"""The serving target as a client sees it: a real `tollgate serve` on 127.0.0.1, real test images, real
requests, including malformed ones and a champion swap under load."""

import io
import json
import math
import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from pipeline.core import paths
from tests.support import Server, champion_back, http, model_client, run, set_param

pytestmark = pytest.mark.slow
NAME = "tollgate-classifier"


@pytest.fixture(scope="module")
def project(two_versions):
    """A project with two registered versions, v2 @champion and v1 @previous."""
    champion_back(two_versions)
    model_client(two_versions).set_registered_model_alias(NAME, "previous", "1")
    return two_versions


@pytest.fixture(scope="module")
def server(project):
    srv = Server(project, {"PYTHONPROFILEIMPORTTIME": "1"})  # its log names every module it imports
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def test_split(project):
    from pipeline.data.prepared import load_split

    return load_split(project / paths.PREPARED_DIR, "test")


def _png(img: np.ndarray, size: tuple[int, int] | None = None, mode: str = "L") -> bytes:
    from PIL import Image

    pic = Image.fromarray(img[..., 0]).convert(mode)
    if size:
        pic = pic.resize(size)
    buf = io.BytesIO()
    pic.save(buf, format="PNG")
    return buf.getvalue()


def _json(obj) -> bytes:
    return json.dumps(obj).encode()


JSON = {"Content-Type": "application/json"}


def test_predict_names_the_right_class_for_real_test_images(server, test_split):
    n, correct = 60, 0
    for img, label in zip(test_split.x[:n], test_split.y[:n], strict=True):
        status, body = http(
            "POST", server.url + "/predict", _png(np.asarray(img)), {"Content-Type": "image/png"}
        )
        assert status == 200 and body["version"] == "2" and len(body["predictions"]) == 3
        probs = [p["probability"] for p in body["predictions"]]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001
        correct += body["predictions"][0]["class"] == test_split.classes[label]
    assert correct >= 0.95 * n


def test_predict_accepts_what_curl_data_binary_sends(server, test_split):
    # `curl --data-binary @digit.png URL` labels the body application/x-www-form-urlencoded
    png = _png(np.asarray(test_split.x[0]))
    status, body = http(
        "POST", server.url + "/predict", png, {"Content-Type": "application/x-www-form-urlencoded"}
    )
    assert status == 200
    assert body["predictions"][0]["class"] == test_split.classes[test_split.y[0]]


def test_predict_takes_multipart_uploads_any_size_and_rgb(server, test_split):
    img = np.asarray(test_split.x[0])
    label = test_split.classes[test_split.y[0]]
    boundary = "tollgateboundary"
    png = _png(img, size=(64, 64), mode="RGB")  # bigger and in colour: resized and converted like training
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="digit.png"\r\n'
            f"Content-Type: image/png\r\n\r\n"
        ).encode()
        + png
        + f"\r\n--{boundary}--\r\n".encode()
    )
    status, out = http(
        "POST",
        server.url + "/predict?top_k=1",
        body,
        {"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    assert status == 200 and len(out["predictions"]) == 1
    assert out["predictions"][0]["class"] == label


def test_invocations_match_the_registered_model(server, project, test_split):
    from pipeline.training.model import load, predict_proba

    model, _ = load(project / paths.MODEL_DIR)
    x = np.asarray(test_split.x[:32])
    expected = predict_proba(model, x).numpy()
    for key in ("inputs", "instances"):
        status, out = http("POST", server.url + "/invocations", _json({key: x.tolist()}), JSON)
        assert status == 200
        np.testing.assert_allclose(np.asarray(out["predictions"]), expected, rtol=1e-4, atol=1e-6)


def test_open_inference_protocol_v2_shapes(server, test_split):
    assert http("GET", server.url + "/v2/health/live")[0] == 200
    assert http("GET", server.url + "/v2/health/ready")[0] == 200
    assert http("GET", f"{server.url}/v2/models/{NAME}/ready")[1] == {"name": NAME, "ready": True}
    status, meta = http("GET", f"{server.url}/v2/models/{NAME}")
    assert status == 200
    assert meta["name"] == NAME and meta["versions"] == ["2"] and meta["platform"] == "pytorch"
    assert meta["inputs"] == [{"name": "pixels", "datatype": "FP32", "shape": [-1, 8, 8, 1]}]
    assert meta["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}]

    x = np.asarray(test_split.x[:4], dtype=np.uint8)
    request = {
        "id": "req-7",
        "inputs": [
            {"name": "pixels", "shape": list(x.shape), "datatype": "UINT8", "data": x.ravel().tolist()}
        ],
    }
    status, out = http("POST", f"{server.url}/v2/models/{NAME}/infer", _json(request), JSON)
    assert status == 200
    assert out["model_name"] == NAME and out["model_version"] == "2" and out["id"] == "req-7"
    (tensor,) = out["outputs"]
    assert tensor["name"] == "probabilities" and tensor["datatype"] == "FP32" and tensor["shape"] == [4, 10]
    probs = np.asarray(tensor["data"]).reshape(tensor["shape"])
    assert probs.sum(axis=1) == pytest.approx(np.ones(4), abs=1e-4)
    assert [test_split.classes[i] for i in probs.argmax(1)] == [
        test_split.classes[y] for y in test_split.y[:4]
    ]


def _bomb() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (20000, 20000)).save(buf, format="PNG")  # a few KB that unpack to 400 MB
    return buf.getvalue()


BAD = [
    ("POST", "/invocations", b"{not json", JSON, 400, "valid JSON"),
    ("POST", "/invocations", _json({"inputs": [[1, 2, 3]]}), JSON, 400, "shape"),
    ("POST", "/invocations", _json({"rows": []}), JSON, 400, '"inputs"'),
    ("POST", "/invocations", _json({"inputs": [[[["a"]] * 8] * 8]}), JSON, 400, "numbers"),
    ("POST", "/invocations", json.dumps({"inputs": [[[[math.nan]] * 8] * 8]}).encode(), JSON, 400, "NaN"),
    (
        "POST",
        "/invocations",
        _json({"inputs": [[[[1]] * 8] * 8]}),
        {"Content-Type": "text/plain"},
        415,
        "json",
    ),
    ("POST", "/invocations", b"", JSON, 400, "empty"),
    ("POST", "/predict", b"", {"Content-Type": "image/png"}, 400, "empty"),
    ("POST", "/predict", b"GIF89a not really", {"Content-Type": "image/png"}, 400, "PNG or JPEG"),
    ("POST", "/predict", b"{}", {"Content-Type": "application/json"}, 415, "PNG/JPEG"),
    ("POST", "/predict", _bomb(), {"Content-Type": "image/png"}, 413, "pixels"),
    (
        "POST",
        f"/v2/models/{NAME}/infer",
        _json({"inputs": [{"shape": [1, 8, 8, 1], "datatype": "FP32", "data": [1, 2]}]}),
        JSON,
        400,
        "data matching shape",
    ),
    (
        "POST",
        f"/v2/models/{NAME}/infer",
        _json({"inputs": [{"shape": [1, 8, 8, 1], "datatype": "BYTES", "data": [1] * 64}]}),
        JSON,
        400,
        "datatype",
    ),
    (
        "POST",
        f"/v2/models/{NAME}/infer",
        _json({"inputs": [{"shape": [1, 8, 8, 1], "datatype": "FP16", "data": [1e5] * 64}]}),
        JSON,
        400,
        "finite",
    ),
    ("POST", "/v2/models/other/infer", _json({"inputs": []}), JSON, 404, "unknown model"),
    ("GET", "/v2/models/someone-else", None, {}, 404, "unknown model"),
    ("POST", "/admin/reload", b"", {}, 401, "token"),
    ("POST", "/admin/reload", b"", {"Authorization": "Bearer wrong"}, 401, "token"),
]


@pytest.mark.parametrize(
    ("method", "path", "body", "headers", "status", "says"),
    BAD,
    ids=[f"{m} {p} {s} {w}" for m, p, _, _, s, w in BAD],
)
def test_bad_input_gets_a_4xx_saying_what_was_expected(
    server, test_split, method, path, body, headers, status, says
):
    got, payload = http(method, server.url + path, body, headers)
    assert got == status
    # the error where each protocol's clients read it: `error` on the Open Inference Protocol's routes
    assert says.lower() in payload["error" if path.startswith("/v2") else "detail"].lower()
    # and the server keeps answering correctly
    ok, out = http(
        "POST", server.url + "/invocations", _json({"inputs": np.asarray(test_split.x[:1]).tolist()}), JSON
    )
    assert ok == 200 and len(out["predictions"]) == 1


def test_an_oversized_body_is_refused_before_it_is_read(server, test_split):
    from http.client import HTTPConnection

    conn = HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.putrequest("POST", "/invocations")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(11 * 1024 * 1024))
    conn.endheaders()  # headers only: the server must answer without waiting for 11 MB
    resp = conn.getresponse()
    assert resp.status == 413
    assert "at most" in json.loads(resp.read())["detail"]
    conn.close()
    ok, _ = http(
        "POST", server.url + "/invocations", _json({"inputs": np.asarray(test_split.x[:1]).tolist()}), JSON
    )
    assert ok == 200


def test_binds_loopback_only_by_default(project):
    from pipeline.core.config import load_params

    assert load_params(project / "params.yaml").serve.host == "127.0.0.1"


def test_metrics_are_prometheus_text_with_requests_latency_batches_and_version(server, test_split):
    http("POST", server.url + "/invocations", _json({"inputs": np.asarray(test_split.x[:3]).tolist()}), JSON)
    with urllib.request.urlopen(server.url + "/metrics", timeout=10) as resp:
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = resp.read().decode()
    assert 'tollgate_requests_total{code="200",endpoint="/invocations"}' in text
    assert 'tollgate_requests_total{code="404",endpoint="/v2/models/{model_name}"}' in text
    assert "tollgate_request_latency_seconds_bucket" in text and "tollgate_batch_size_bucket" in text
    assert f'tollgate_model_version{{model="{NAME}",version="2"}} 1.0' in text


def test_concurrent_requests_are_batched(server, test_split):
    def batches() -> float:
        with urllib.request.urlopen(server.url + "/metrics", timeout=10) as resp:
            text = resp.read().decode()
        count = float(
            next(
                line.split()[-1] for line in text.splitlines() if line.startswith("tollgate_batch_size_count")
            )
        )
        total = float(
            next(line.split()[-1] for line in text.splitlines() if line.startswith("tollgate_batch_size_sum"))
        )
        return count, total

    before = batches()
    body = _json({"inputs": np.asarray(test_split.x[:1]).tolist()})
    with ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(lambda _: http("POST", server.url + "/invocations", body, JSON)[0], range(400)))
    after = batches()
    assert codes == [200] * 400
    forward_passes, images = after[0] - before[0], after[1] - before[1]
    assert images == 400
    assert forward_passes < 400  # several requests shared a forward pass


def test_reload_under_load_drops_no_request_and_reports_the_new_version(server, project, test_split):
    body = _json({"inputs": np.asarray(test_split.x[:2]).tolist()})
    stop = threading.Event()
    results: list[tuple[int, str]] = []

    def client():
        while not stop.is_set():
            status, out = http("POST", server.url + "/invocations", body, JSON)
            results.append((status, out.get("version") if isinstance(out, dict) else None))

    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    try:
        run(["tollgate", "rollback"], cwd=project)  # @champion v2 -> v1, server reloads mid-burst
        run(["tollgate", "rollback"], cwd=project)  # and back to v2
        run(["tollgate", "rollback"], cwd=project)  # and to v1 again
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert len(results) > 50
    assert all(status == 200 for status, _ in results), {s for s, _ in results}
    versions = [v for _, v in results]
    assert {"1", "2"} <= set(versions)
    assert http("GET", f"{server.url}/v2/models/{NAME}")[1]["versions"] == ["1"]


def test_the_server_process_never_imports_mlflow(server, project, test_split):
    """Replicas multiply a server's memory, and MLflow's client is ~160 MB of it: the server reads the
    registry without it, through loading, two reloads by promotion and requests."""
    served = http("GET", f"{server.url}/v2/models/{NAME}")[1]["versions"]
    run(["tollgate", "rollback"], cwd=project)  # @champion to @previous: the server reloads
    run(["tollgate", "rollback"], cwd=project)  # and back
    body = _json({"inputs": np.asarray(test_split.x[:2]).tolist()})
    assert http("POST", server.url + "/invocations", body, JSON)[0] == 200
    assert http("GET", f"{server.url}/v2/models/{NAME}")[1]["versions"] == served
    trace = Path(server.log.name).read_text().splitlines()
    imported = {line.rsplit("|", 1)[1].strip() for line in trace if line.startswith("import time:")}
    assert {"pipeline.serving.app", "pipeline.registry.reader", "torch"} <= imported  # the trace is whole
    assert not {m for m in imported if m.split(".")[0] == "mlflow"}


def test_kserve_target_writes_an_inference_service_for_the_champion(project):
    import yaml

    run(["tollgate", "deploy", "--target", "kserve"], cwd=project)
    manifest = yaml.safe_load((project / paths.KSERVE_MANIFEST).read_text())
    assert manifest["apiVersion"] == "serving.kserve.io/v1beta1" and manifest["kind"] == "InferenceService"
    predictor = manifest["spec"]["predictor"]["model"]
    assert predictor["modelFormat"]["name"] == "mlflow" and predictor["protocolVersion"] == "v2"
    client = model_client(project)
    champion = client.get_model_version_by_alias(NAME, "champion").version
    assert predictor["storageUri"] == client.get_model_version_download_uri(NAME, champion)
    assert manifest["metadata"]["labels"]["tollgate/model-version"] == str(champion)


def test_mlflow_target_prints_the_command_for_mlflows_own_server(project):
    out = run(["tollgate", "deploy", "--target", "mlflow"], cwd=project).stdout
    assert f'mlflow models serve -m "models:/{NAME}@champion"' in out


def test_a_second_server_on_a_busy_port_fails_and_leaves_the_first_ones_state(project, server):
    state = (project / paths.SERVER_STATE).read_bytes()
    proc = run(["tollgate", "serve", "--port", str(server.port)], cwd=project, check=False)
    assert proc.returncode != 0 and "cannot listen on 127.0.0.1" in proc.stderr
    assert (project / paths.SERVER_STATE).read_bytes() == state  # still the running server's address
    assert json.loads(state)["pid"] == server.proc.pid
    assert oct((project / paths.SERVER_STATE).stat().st_mode & 0o777) == "0o600"  # it holds the token


def test_a_stopped_server_withdraws_its_state(project, server):
    """SIGTERM (what `kill`, systemd and Kubernetes send) takes the state file with the server; a later
    server on the same URL must never be handed an old token."""
    import signal

    state = (project / paths.SERVER_STATE).read_bytes()
    other = Server(project)  # publishes itself in place of the module's server
    try:
        assert json.loads((project / paths.SERVER_STATE).read_text())["pid"] == other.proc.pid
        other.proc.send_signal(signal.SIGTERM)
        other.proc.wait(timeout=30)
        assert not (project / paths.SERVER_STATE).exists()
    finally:
        other.log.close()
        (project / paths.SERVER_STATE).write_bytes(state)  # the module's server is still running
        (project / paths.SERVER_STATE).chmod(0o600)


def _multipart(payload: bytes) -> tuple[bytes, str]:
    boundary = "tollgateboundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + payload
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


def _send_until_answered(port: int, head: bytes, chunks) -> bytes:
    """Send a request head, then body chunks until the server answers (it may refuse a body half-way and
    close, as it should); returns the answer."""
    import contextlib
    import select
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head)
        for chunk in chunks:
            if select.select([sock], [], [], 0)[0]:
                break
            try:
                sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
        answer = b""
        with contextlib.suppress(ConnectionResetError):  # the server closes on a body it will not read
            while b"\r\n\r\n" not in answer or not answer.endswith(b"}"):
                if not (part := sock.recv(65536)):
                    break
                answer += part
        return answer


def test_a_multipart_upload_over_the_body_limit_is_refused(server, test_split):
    body, kind = _multipart(b"\0" * (11 * 1024 * 1024))  # serve.max_body_mb is 10
    step = 256 * 1024
    declared = (
        f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: {kind}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    answer = _send_until_answered(
        server.port, declared.encode(), (body[i : i + step] for i in range(0, len(body), step))
    )
    assert answer.startswith(b"HTTP/1.1 413") and b"at most" in answer
    chunked = (
        f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: {kind}\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    frames = (
        b"%x\r\n%s\r\n" % (len(body[i : i + step]), body[i : i + step]) for i in range(0, len(body), step)
    )
    answer = _send_until_answered(server.port, chunked.encode(), frames)  # no length: counted as it arrives
    assert answer.startswith(b"HTTP/1.1 413") and b"larger than" in answer
    ok, _ = http(
        "POST", server.url + "/predict", _png(np.asarray(test_split.x[0])), {"Content-Type": "image/png"}
    )
    assert ok == 200


def test_a_request_with_too_many_images_is_refused_while_others_keep_flowing(server, test_split):
    """36,000 images in one 10 MB body used to hold the event loop for seconds."""
    import time

    pixels = np.zeros((36_000, 8, 8, 1), dtype=np.uint8).tolist()
    body = json.dumps({"inputs": pixels}, separators=(",", ":")).encode()
    assert len(body) < 10 * 1024 * 1024
    result, pings = {}, []

    def big():
        result["big"] = http("POST", server.url + "/invocations", body, JSON)

    sender = threading.Thread(target=big)
    sender.start()
    while sender.is_alive():
        start = time.perf_counter()
        assert http("GET", server.url + "/v2/health/live")[0] == 200
        pings.append(time.perf_counter() - start)
        time.sleep(0.02)
    status, out = result["big"]
    assert status == 413 and "36000 images in one request; at most 1024" in out["detail"]
    assert max(pings) < 1.0, pings  # answered throughout (seconds-long stalls before)


def test_slow_clients_are_cut_off_and_do_not_hold_the_server(project):
    """Slowloris: connections that send their request head or body a trickle at a time."""
    import socket
    import time

    set_param(project, "serve.header_timeout_s", 1.0)
    set_param(project, "serve.body_timeout_s", 2.0)
    try:
        # pinned to one version: it publishes no state, the module's server stays the registered one
        slow = Server(project, args=("--model-uri", f"models:/{NAME}/1"))
    finally:
        set_param(project, "serve.header_timeout_s", 10.0)
        set_param(project, "serve.body_timeout_s", 30.0)
    try:
        heads = [socket.create_connection(("127.0.0.1", slow.port), timeout=10) for _ in range(50)]
        for s in heads:
            s.sendall(b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: app")  # never finished
        silent = socket.create_connection(("127.0.0.1", slow.port), timeout=10)  # sends nothing at all
        body = socket.create_connection(("127.0.0.1", slow.port), timeout=10)
        body.sendall(
            b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 1000\r\n\r\n{"inputs": '
        )
        ok, _ = http("GET", slow.url + "/v2/health/live")  # the server still takes new clients meanwhile
        assert ok == 200
        start = time.monotonic()
        answers = [_read_until_closed(s) for s in [*heads, silent, body]]
        assert all(a.startswith(b"HTTP/1.1 408") for a in answers), {a[:20] for a in answers}
        assert time.monotonic() - start < 8  # cut off after the deadlines, not left open
        assert http("GET", slow.url + "/v2/health/live")[0] == 200
    finally:
        slow.stop()


def _read_until_closed(sock) -> bytes:
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    sock.close()
    return data


def test_odd_but_harmless_requests_get_4xx_not_500(server):
    from http.client import HTTPConnection

    conn = HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.putrequest("POST", "/admin/reload")
    conn.putheader("Authorization", "Bearer tökén".encode())  # non-ASCII bytes in the header
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 401 and "token" in json.loads(resp.read())["detail"]
    conn.close()
    oip = {"inputs": [{"name": "pixels", "shape": [1, 8, 8, 1], "datatype": "UINT8", "data": [256] * 64}]}
    status, out = http("POST", f"{server.url}/v2/models/{NAME}/infer", _json(oip), JSON)
    assert status == 400 and "0..255" in out["error"]
    status, out = http("POST", server.url + "/invocations", _json({"inputs": [[[["7"]] * 8] * 8]}), JSON)
    assert status == 400 and "numbers" in out["detail"]
