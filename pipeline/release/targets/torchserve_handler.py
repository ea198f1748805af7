"""TorchServe handler for a tollgate model archive (`tollgate deploy --target torchserve`).

The archive carries the weights (`model.pt`, a state dict: loading never unpickles code), `model.json`, its
own copy of the `pipeline` package and `tollgate.json` (the served version and request limits). When
`serve.runtime` asks for ONNX and the version's gate let an ONNX artefact serve, the archive carries that
file and its choice (`runtimes.json`) too, and ONNX Runtime answers, as in `tollgate serve`. Requests
are parsed by `pipeline.serving.protocols`, the code `tollgate serve` runs: a PNG/JPEG body is decoded by
`pipeline.data.images`, the function training's prepare uses, and a JSON body takes MLflow's scoring format
(`{"inputs" | "instances": pixels}`). A bad request gets the 4xx `tollgate serve` would give, alone: the
other requests of its batch are answered, and the worker keeps serving.
"""

import json
import os
import sys

SETTINGS = "tollgate.json"  # the served version and request limits, written by targets/torchserve.py


class TollgateHandler:
    def __init__(self):
        self.initialized = False

    def initialize(self, context) -> None:
        model_dir = context.system_properties["model_dir"]
        sys.path.insert(0, model_dir)  # the archive's own `pipeline`, whatever else is installed
        from pathlib import Path

        from pipeline.serving.served import read

        with open(os.path.join(model_dir, SETTINGS)) as f:
            self.settings = json.load(f)
        s = self.settings
        self.served = read(s["version"], Path(model_dir), s["runtime"], s["threads"])
        self.meta = self.served.meta
        self.initialized = True

    def _pixels(self, body):
        from pipeline.serving import protocols

        shape = self.meta["input_shape"]
        if isinstance(body, (bytes, bytearray)) and not bytes(body[:1]).strip().startswith((b"{", b"[")):
            return protocols.pixels_from_image(bytes(body), self.meta, self.settings["max_image_pixels"])
        if isinstance(body, (bytes, bytearray)):
            body = protocols.parse_json({"content-type": "application/json"}, bytes(body))
        return protocols.pixels_from_json(body, shape, self.settings["max_request_images"])

    def handle(self, data, context):
        import numpy as np

        from pipeline.serving.protocols import Refused

        out: list = [None] * len(data)
        taken = []
        for i, row in enumerate(data):
            body = row.get("data") if row.get("data") is not None else row.get("body")
            try:
                taken.append((i, self._pixels(body)))
            except Refused as err:
                context.set_response_status(err.status, err.detail, idx=i)
                out[i] = {"detail": err.detail}
        if taken:
            probs, _ = self.served.predict(np.concatenate([x for _, x in taken]), False)
            classes = self.meta["classes"]
            start = 0
            for i, x in taken:
                rows = probs[start : start + len(x)]
                start += len(x)
                out[i] = {
                    "predictions": rows.tolist(),
                    "classes": [classes[k] for k in rows.argmax(1)],
                    "version": self.settings["version"],
                    "runtime": self.served.runtime,
                }
        return out
