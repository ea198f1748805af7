"""The registered model as an MLflow pyfunc, logged as "model from code": MLflow stores this file and the
weights, not a pickle, so `mlflow models serve`, `mlflow.pyfunc.load_model` and tollgate's own server all
rebuild the network from code plus `model.json`.

Input: uint8 pixels (N, H, W, C), as prepare writes them and as images are (the signature says so, and
MLflow refuses other dtypes naming it). Output: class probabilities (N, n_classes), float32.
"""

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel

from pipeline.training.model import load, predict_proba
from pipeline.training.model_folder import MLFLOW_ARTIFACT


class TollgateModel(PythonModel):
    def load_context(self, context):
        self.model, self.meta = load(context.artifacts[MLFLOW_ARTIFACT])

    def predict(self, context, model_input: np.ndarray, params=None) -> np.ndarray:
        pixels = np.asarray(model_input, dtype=np.float32)
        return predict_proba(self.model, pixels).numpy()


mlflow.models.set_model(TollgateModel())
