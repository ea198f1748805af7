"""Temperature scaling (Guo et al., 2017): after training, one scalar T is fitted on the validation split
to minimise the negative log-likelihood of logits / T, and saved in the model (a buffer), so every runtime
divides by it. The argmax never changes: accuracy and every predicted class stay as they were; only the
confidences move. Label smoothing, which buys accuracy, leaves a model under-confident: this puts the
calibration error back under the gate's `max_ece` without giving that accuracy up.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.data.prepared import Dataset
from pipeline.training.model import Classifier, logits_of


def fit_temperature(model: Classifier, val: Dataset) -> float:
    """The temperature that makes `model`'s probabilities on `val` most likely; also set on the model."""
    model.temperature.fill_(1.0)
    logits = logits_of(model, val.x).double()
    labels = torch.as_tensor(val.y, dtype=torch.long)
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=100, line_search_fn="strong_wolfe")

    def nll() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    opt.step(nll)
    temperature = float(log_t.detach().exp())
    model.temperature.fill_(temperature)
    return temperature
