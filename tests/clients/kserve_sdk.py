"""The KServe SDK's InferenceRESTClient (Open Inference Protocol v2) against a server, as its users call it:
`python kserve_sdk.py URL MODEL PIXELS.npy json|binary`. Prints what it got as JSON."""

import asyncio
import json
import sys

import httpx
import numpy as np
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig
from kserve.protocol.infer_type import RequestedOutput


async def main() -> dict:
    url, model, pixels, mode = sys.argv[1:5]
    binary = mode == "binary"
    x = np.load(pixels)
    client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=60))
    pixels_in = InferInput("pixels", list(x.shape), "UINT8")
    pixels_in.set_data_from_numpy(x, binary_data=binary)
    asked = [RequestedOutput("probabilities", {"binary_data": binary})]
    headers: dict = {}
    request = InferRequest(model, [pixels_in], request_outputs=asked)
    result = await client.infer(url, request, model_name=model, response_headers=headers)
    out = {
        "live": await client.is_server_live(url),
        "ready": await client.is_server_ready(url),
        "model_ready": await client.is_model_ready(url, model),
        "probs": result.outputs[0].as_numpy().tolist(),
        # the SDK strips binary_data_size once it has decoded the bytes: the header says how they came
        "binary_reply": "inference-header-content-length" in {k.lower() for k in headers},
    }
    try:
        await client.infer(url, InferRequest("no-such-model", [pixels_in]), model_name="no-such-model")
    except httpx.HTTPStatusError as err:
        out["error"] = str(err)
    return out


print(json.dumps(asyncio.run(main())))
