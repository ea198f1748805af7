"""Drift: live traffic compared with a reference taken from training.

The reference travels inside the model folder (`reference.npz`, so every registered version carries its
own) and holds, for up to `train.reference_samples` validation images: the class prior, the model's top
probability (confidence), two input statistics per image (mean and standard deviation of its pixels), and
penultimate-layer embeddings projected on their first `train.reference_components` principal axes.

Four checks, each a scipy test for "is this window different at all" (p-value below `monitor.p_value`)
and an effect size for "different enough to matter" (above its threshold); both must hold, so a large
window does not flag a trivial shift and a tiny one does not flag noise:
- prediction: chi-square of the window's predicted classes against the prior; effect = total variation
  distance between the two class distributions;
- confidence: Kolmogorov-Smirnov of the confidences; effect = mean confidence lost;
- input: KS per input statistic (Bonferroni over the two); effect = the larger KS statistic;
- embedding: KS per principal component (Bonferroni over them); effect = the largest KS statistic.
Univariate KS on a low-dimensional projection of the model's own features is what "Failing Loudly"
(Rabanser et al., NeurIPS 2019) found detects shifts best for its cost; it needs scipy alone, runs in
milliseconds on a 500-sample window (the server recomputes it as traffic flows), and each number is one
a reader can check by hand. Evidently and alibi-detect wrap the same tests with far heavier dependencies.
`tollgate monitor` adds a multivariate check, `mmd`: the kernel two-sample test (maximum mean discrepancy,
Gaussian kernel at the median distance, permutation p-value) on the same projected embeddings, the test
alibi-detect's MMDDrift runs, in a few lines of numpy.

A shift that is significant is not necessarily one that costs accuracy. So the reference also records
which of its images the model got right, and `estimate_accuracy` gives a label-free estimate of the
accuracy on a live window: Average Thresholded Confidence (ATC, Garg et al., ICLR 2022), the share of
live images whose confidence exceeds the threshold that, on the labelled validation images, is exceeded by
exactly the share the model got right; with a Wilson interval. Retraining is for an estimated accuracy
drop beyond `monitor.max_accuracy_drop` (or a check the user lists in `monitor.blocking_checks`), not for
any significant statistic.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.core.config import MonitorConfig
from pipeline.data import arrays
from pipeline.data.prepared import Dataset

REFERENCE = "reference.npz"  # inside the model folder
CHECKS = ("prediction", "confidence", "input", "embedding")


@dataclass(frozen=True)
class Reference:
    prior: np.ndarray  # (K,) class frequencies of the reference images' predictions
    confidence: np.ndarray  # (m,) top probability per image
    inputs: np.ndarray  # (m, 2) pixel mean and std per image, pixels in 0..1
    center: np.ndarray  # (D,) embedding mean
    axes: np.ndarray  # (D, k) principal axes of the embeddings
    projected: np.ndarray  # (m, k) the reference embeddings on those axes
    correct: np.ndarray | None = None  # (m,) whether the model got each image right (older models: None)

    def project(self, embeddings: np.ndarray) -> np.ndarray:
        return (embeddings.astype(np.float32) - self.center) @ self.axes

    @property
    def accuracy(self) -> float | None:
        return None if self.correct is None else float(self.correct.mean())

    @property
    def atc_threshold(self) -> float | None:
        """The confidence that the reference images exceed as often as the model was right on them."""
        if self.correct is None:
            return None
        return float(np.quantile(self.confidence, 1.0 - self.accuracy, method="lower"))


@dataclass(frozen=True)
class Window:
    """What was served: predicted class, confidence, input statistics and embeddings per image."""

    pred: np.ndarray
    confidence: np.ndarray
    inputs: np.ndarray
    embeddings: np.ndarray

    def __len__(self) -> int:
        return len(self.pred)

    def tail(self, n: int) -> Window:
        return Window(self.pred[-n:], self.confidence[-n:], self.inputs[-n:], self.embeddings[-n:])

    def part(self, start: int, stop: int) -> Window:
        return Window(*(a[start:stop] for a in (self.pred, self.confidence, self.inputs, self.embeddings)))


def input_stats(x: np.ndarray) -> np.ndarray:
    """(n, 2): mean and standard deviation of each image's pixels, scaled to 0..1."""
    stats = [np.zeros((0, 2), dtype=np.float32)]
    for _, part in arrays.blocks(x, 16):  # a float copy of 2,000 photos would be 1.2 GB
        flat = part.reshape(len(part), -1).astype(np.float32) / 255.0
        stats.append(np.stack([flat.mean(axis=1), flat.std(axis=1)], axis=1))
    return np.concatenate(stats)


def build_reference(
    probs: np.ndarray,
    embeddings: np.ndarray,
    x: np.ndarray,
    n_classes: int,
    components: int,
    y: np.ndarray | None = None,
) -> Reference:
    """The reference of a model from its outputs on validation images (probabilities, embeddings, pixels)
    and, with their labels `y`, which it got right."""
    pred = probs.argmax(axis=1)
    emb = embeddings.astype(np.float32)
    center = emb.mean(axis=0)
    k = max(1, min(components, emb.shape[1], len(emb) - 1))
    # Principal axes by SVD of the centred embeddings: a fixed linear map any later window reuses.
    _, _, vt = np.linalg.svd(emb - center, full_matrices=False)
    axes = vt[:k].T.astype(np.float32)
    return Reference(
        prior=np.bincount(pred, minlength=n_classes) / max(len(pred), 1),
        confidence=probs.max(axis=1).astype(np.float32),
        inputs=input_stats(x),
        center=center,
        axes=axes,
        projected=(emb - center) @ axes,
        correct=None if y is None else pred == np.asarray(y),
    )


def reference_for(model, train: Dataset, val: Dataset, seed: int, samples: int, components: int) -> Reference:
    """The drift reference of a trained model: its outputs on (a seeded sample of) the validation split, or
    of the training split when there is next to no validation split (data.val_fraction 0)."""
    from pipeline.training.model import predict_with_embeddings

    source = val if len(val.y) >= 10 else train
    n = min(len(source.y), samples)
    idx = np.sort(np.random.default_rng(seed).choice(len(source.y), n, replace=False))
    x = arrays.take(source.x, idx)
    probs, emb = predict_with_embeddings(model.cpu().eval(), x)
    return build_reference(probs.numpy(), emb.numpy(), x, len(source.classes), components, source.y[idx])


class DamagedReference(ValueError):
    """A model folder's drift reference cannot be read; the message names the file."""


def write_reference(folder: Path, ref: Reference) -> None:
    from pipeline.core.files import write_arrays

    fields = {k: getattr(ref, k) for k in Reference.__dataclass_fields__}
    write_arrays(folder / REFERENCE, {k: v for k, v in fields.items() if v is not None})


def read_reference(folder: Path) -> Reference | None:
    """The reference in a model folder, or None for a model trained before references existed. A damaged
    one raises DamagedReference naming the file."""
    import zipfile

    path = Path(folder) / REFERENCE
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            return Reference(**{k: z[k] for k in Reference.__dataclass_fields__ if k in z.files})
    except (ValueError, EOFError, OSError, TypeError, zipfile.BadZipFile) as err:
        raise DamagedReference(f"{REFERENCE} cannot be read ({type(err).__name__}: {err})") from None


def wilson_interval(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a share `p` of `n` trials ((0, 1) when there are none)."""
    if n == 0:
        return 0.0, 1.0
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def estimate_accuracy(ref: Reference, confidence: np.ndarray, z: float = 1.96) -> dict | None:
    """ATC: the share of `confidence` above the reference's threshold, with a Wilson interval; None for a
    reference without labels."""
    if ref.correct is None or len(confidence) == 0:
        return None
    est = float((confidence > ref.atc_threshold).mean())
    low, high = wilson_interval(est, len(confidence), z)
    return {"estimate": est, "low": low, "high": high}


def mmd(live: np.ndarray, ref: np.ndarray, permutations: int, seed: int = 0) -> tuple[float, float]:
    """Unbiased MMD² between two samples with a Gaussian kernel at the median pairwise distance, and its
    permutation p-value (the share of random splits of the pooled sample at least as far apart)."""
    rng = np.random.default_rng(seed)
    ref = ref[rng.choice(len(ref), min(len(ref), len(live)), replace=False)]  # equal sizes, bounded cost
    pooled = np.concatenate([live, ref]).astype(np.float64)
    sq = (pooled * pooled).sum(1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * pooled @ pooled.T, 0.0)
    kernel = np.exp(-d2 / max(np.median(d2[np.triu_indices(len(pooled), 1)]), 1e-12))
    np.fill_diagonal(kernel, 0.0)
    n, m = len(live), len(ref)

    def statistic(order: np.ndarray) -> float:
        a, b = order[:n], order[n:]
        kxx, kyy, kxy = kernel[np.ix_(a, a)].sum(), kernel[np.ix_(b, b)].sum(), kernel[np.ix_(a, b)].sum()
        return kxx / (n * (n - 1)) + kyy / (m * (m - 1)) - 2 * kxy / (n * m)

    observed = statistic(np.arange(n + m))
    null = [statistic(rng.permutation(n + m)) for _ in range(permutations)]
    return float(observed), float((1 + sum(v >= observed for v in null)) / (1 + permutations))


def _ks(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    from scipy.stats import ks_2samp

    res = ks_2samp(a, b)
    return float(res.statistic), float(res.pvalue)


def _ks_columns(live: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """KS per column of two (n, d) samples: the largest statistic and the smallest p-value, Bonferroni
    corrected for the d tests."""
    stats = [_ks(live[:, j], ref[:, j]) for j in range(ref.shape[1])]
    return max(s for s, _ in stats), min(1.0, min(p for _, p in stats) * len(stats))


def _checks(ref: Reference, window: Window, cfg: MonitorConfig, multivariate: bool) -> dict:
    """(effect, p-value, threshold) of every check."""
    from scipy.stats import chisquare

    n, k = len(window), len(ref.prior)
    counts = np.bincount(window.pred, minlength=k)[:k]
    # A class the reference never predicted gets a pseudo-count, so its appearance counts instead of dividing
    # by zero.
    expected = (ref.prior * len(ref.confidence) + 0.5) / (len(ref.confidence) + 0.5 * k)
    p_pred = float(chisquare(counts, expected * counts.sum()).pvalue)
    checks = {
        "prediction": (float(0.5 * np.abs(counts / n - ref.prior).sum()), p_pred, cfg.max_prediction_shift)
    }
    _, p_conf = _ks(window.confidence, ref.confidence)
    checks["confidence"] = (
        float(ref.confidence.mean() - window.confidence.mean()),
        p_conf,
        cfg.max_confidence_drop,
    )
    checks["input"] = (*_ks_columns(window.inputs, ref.inputs), cfg.max_input_shift)
    projected = ref.project(window.embeddings)
    checks["embedding"] = (*_ks_columns(projected, ref.projected), cfg.max_embedding_shift)
    if multivariate:
        checks["mmd"] = (*mmd(projected, ref.projected, cfg.mmd_permutations), cfg.max_mmd)
    return checks


def _accuracy(ref: Reference, window: Window, cfg: MonitorConfig) -> dict | None:
    """The label-free accuracy estimate of the window against the reference's, and whether its drop is
    beyond `monitor.max_accuracy_drop` with the interval's upper end (a drop the estimate is sure of)."""
    est = estimate_accuracy(ref, window.confidence)
    if est is None:
        return None
    drop = ref.accuracy - est["estimate"]
    return {
        "method": "ATC (average thresholded confidence)",
        "reference": round(ref.accuracy, 6),
        "threshold_confidence": round(ref.atc_threshold, 6),
        **{k: round(v, 6) for k, v in est.items()},
        "drop": round(drop, 6),
        "max_drop": cfg.max_accuracy_drop,
        "flags": bool(ref.accuracy - est["high"] > cfg.max_accuracy_drop),
    }


def compare(ref: Reference, window: Window, cfg: MonitorConfig, multivariate: bool = False) -> dict:
    """Every check of `window` against `ref` (with `multivariate`, MMD too): statistic, p-value, threshold,
    and whether it flags; `drift` is True when any does. The accuracy estimate, and `retrain`: whether that
    estimate dropped beyond `monitor.max_accuracy_drop`, or a check in `monitor.blocking_checks` flags. A
    window under `monitor.min_samples` gets no verdict (`drift` None)."""
    n = len(window)
    out: dict = {"samples": n, "drift": None, "retrain": None, "checks": {}}
    if n < cfg.min_samples:
        out["reason"] = f"{n} samples, fewer than monitor.min_samples {cfg.min_samples}: no verdict"
        return out
    for name, (effect, p, threshold) in _checks(ref, window, cfg, multivariate).items():
        out["checks"][name] = {
            "effect": round(effect, 6),
            "p_value": p,
            "threshold": threshold,
            "drift": bool(effect > threshold and p < cfg.p_value),
        }
    out["drift"] = any(c["drift"] for c in out["checks"].values())
    out["accuracy"] = _accuracy(ref, window, cfg)
    why = (
        [f"estimated accuracy dropped by {out['accuracy']['drop']:.3f}"]
        if (out["accuracy"] or {}).get("flags")
        else []
    )
    why += [f"{c} (blocking)" for c in cfg.blocking_checks if out["checks"].get(c, {}).get("drift")]
    out["retrain"] = bool(why)
    out["retrain_reason"] = "; ".join(why) if why else "no estimated accuracy drop, no blocking check flags"
    counts = np.bincount(window.pred, minlength=len(ref.prior))[: len(ref.prior)]
    out["live_prior"] = (counts / n).round(6).tolist()
    out["reference_prior"] = ref.prior.round(6).tolist()
    out["confidence"] = {"reference": float(ref.confidence.mean()), "live": float(window.confidence.mean())}
    return out


def first_alarm(ref: Reference, window: Window, cfg: MonitorConfig, start: int, step: int = 50) -> int | None:
    """How many samples after position `start` the monitor first flags drift, judging the newest
    `monitor.window` samples every `step` samples (as the server's rolling figures do); None if never."""
    for end in range(start + step, len(window) + 1, step):
        if compare(ref, window.part(max(0, end - cfg.window), end), cfg)["drift"]:
            return end - start
    return None
