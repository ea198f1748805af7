"""Triton's own Python client (tritonclient.http) against a server, as its users call it: `python triton.py
URL MODEL PIXELS.npy json|binary`. Prints what it got as JSON (probabilities, metadata, readiness, the
error text of a version that is not served)."""

import json
import sys

import numpy as np
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

url, model, pixels, mode = sys.argv[1:5]
binary = mode == "binary"
x = np.load(pixels)
client = httpclient.InferenceServerClient(
    url.removeprefix("http://"), connection_timeout=60, network_timeout=60
)
meta = client.get_model_metadata(model)
version = meta["versions"][0]
pixels_in = httpclient.InferInput("pixels", list(x.shape), "UINT8")
pixels_in.set_data_from_numpy(x, binary_data=binary)
asked = [httpclient.InferRequestedOutput("probabilities", binary_data=binary)]
out = {
    "live": client.is_server_live(),
    "ready": client.is_server_ready(),
    "model_ready": client.is_model_ready(model),
    "version_ready": client.is_model_ready(model, model_version=version),
    "extensions": client.get_server_metadata()["extensions"],
    "version": version,
    "probs": client.infer(model, [pixels_in], outputs=asked).as_numpy("probabilities").tolist(),
    # no outputs named: the client asks for every output as binary data
    "probs_versioned": client.infer(model, [pixels_in], model_version=version)
    .as_numpy("probabilities")
    .tolist(),
}
try:
    client.infer(model, [pixels_in], model_version="999")
except InferenceServerException as err:
    out["error"] = {"status": err.status(), "message": err.message()}
print(json.dumps(out))
