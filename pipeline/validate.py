"""validate: a Great Expectations suite over the prepared data, built from params (reviewed as code).

GX sees two tables: one row per image (shape, dtype, pixel range, label, content hash) for each split,
and one row per (split, class) with its image count, zero-filled so an absent class is a visible row.
The result is data: every expectation with its outcome and a sentence naming what is wrong.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from pipeline.config import ValidateConfig
from pipeline.data import SPLITS, image_hashes, load_split, read_manifest


def image_table(x: np.ndarray, y: np.ndarray):
    import pandas as pd

    n = len(x)
    flat = x.reshape(n, int(np.prod(x.shape[1:])))  # explicit width: an empty split has no -1 to infer
    return pd.DataFrame(
        {
            "height": np.full(n, x.shape[1]),
            "width": np.full(n, x.shape[2]),
            "channels": np.full(n, x.shape[3]),
            "dtype": [str(x.dtype)] * n,
            "pixel_min": flat.min(axis=1, initial=255),
            "pixel_max": flat.max(axis=1, initial=0),
            "label": y,
            "hash": image_hashes(x),
        }
    )


def count_table(counts: dict[str, list[int]], classes: list[str]):
    import pandas as pd

    rows = [(s, c, n) for s, per_class in counts.items() for c, n in zip(classes, per_class, strict=True)]
    return pd.DataFrame(rows, columns=["split", "class", "count"])


def _image_suite(
    gx, name: str, cfg: ValidateConfig, shape: list[int], n_classes: int, train_hashes: list[str]
):
    E = gx.expectations
    h, w, c = shape
    checks = [
        ("dtype is uint8", E.ExpectColumnValuesToBeInSet(column="dtype", value_set=["uint8"])),
        ("image height", E.ExpectColumnValuesToBeInSet(column="height", value_set=[h])),
        ("image width", E.ExpectColumnValuesToBeInSet(column="width", value_set=[w])),
        ("channel count", E.ExpectColumnValuesToBeInSet(column="channels", value_set=[c])),
        ("pixel range (min)", E.ExpectColumnValuesToBeBetween(column="pixel_min", min_value=cfg.pixel_min)),
        ("pixel range (max)", E.ExpectColumnValuesToBeBetween(column="pixel_max", max_value=cfg.pixel_max)),
        (
            "labels in class list",
            E.ExpectColumnValuesToBeInSet(column="label", value_set=list(range(n_classes))),
        ),
        ("at least one image", E.ExpectTableRowCountToBeBetween(min_value=1)),
    ]
    if train_hashes:
        checks.append(
            (
                "no images shared with train",
                E.ExpectColumnValuesToNotBeInSet(column="hash", value_set=train_hashes),
            )
        )
    suite = gx.ExpectationSuite(name=name)
    for check, exp in checks:
        exp.meta = {"check": check}
        suite.add_expectation(exp)
    return suite


def _count_suite(gx, cfg: ValidateConfig):
    exp = gx.expectations.ExpectColumnValuesToBeBetween(column="count", min_value=cfg.min_per_class)
    exp.meta = {"check": f"every class has >= {cfg.min_per_class} images in every split"}
    suite = gx.ExpectationSuite(name="class_counts")
    suite.add_expectation(exp)
    return suite


def _explain(result, frame) -> str:
    """One sentence naming the fault and the offending values, rows or classes."""
    r = dict(result.result)
    kw = result.expectation_config.kwargs
    kind = result.expectation_config.type
    if kind == "expect_table_row_count_to_be_between":
        return f"table has {r.get('observed_value')} rows"
    if "column" not in kw:
        return f"{kind} failed: {r}"
    col = kw["column"]
    if col == "count":
        bad = frame[frame["count"] < kw["min_value"]]
        return "too few images: " + ", ".join(
            f"class {row['class']} has {row['count']} in {row['split']}" for _, row in bad.iterrows()
        )
    n_bad = r.get("unexpected_count", 0)
    sample = sorted({str(v) for v in r.get("partial_unexpected_list", [])})[:5]
    if col == "hash":
        return f"{n_bad} images also in the train split (identical content, e.g. hash {', '.join(sample)})"
    return f"{n_bad} rows with unexpected {col} (e.g. {', '.join(sample)})"


def run_suite(prepared_dir: str | Path, cfg: ValidateConfig) -> dict:
    """Validate the prepared splits: the report (`passed` plus every check); never raises on bad data."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    manifest = read_manifest(prepared_dir)
    classes = manifest["classes"]
    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    batches = ctx.data_sources.add_pandas("tollgate").add_dataframe_asset("prepared")
    whole = batches.add_batch_definition_whole_dataframe("whole")

    frames = {}
    counts = {}
    for split in SPLITS:
        part = load_split(prepared_dir, split)
        frames[split] = image_table(part.x, part.y)
        counts[split] = np.bincount(
            part.y[(part.y >= 0) & (part.y < len(classes))], minlength=len(classes)
        ).tolist()
    train_hashes = sorted(set(frames["train"]["hash"]))

    runs = [
        (
            split,
            frames[split],
            _image_suite(
                gx,
                f"images_{split}",
                cfg,
                manifest["image_shape"],
                len(classes),
                [] if split == "train" else train_hashes,
            ),
        )
        for split in SPLITS
    ]
    runs.append(("all splits", count_table(counts, classes), _count_suite(gx, cfg)))

    checks = []
    for scope, frame, suite in runs:
        suite = ctx.suites.add(suite)
        result = whole.get_batch(batch_parameters={"dataframe": frame}).validate(suite)
        for res in result.results:
            checks.append(
                {
                    "scope": scope,
                    "check": res.expectation_config.meta["check"],
                    "expectation": res.expectation_config.type,
                    "success": bool(res.success),
                    "message": "" if res.success else _explain(res, frame),
                }
            )
    failed = [c for c in checks if not c["success"]]
    return {
        "passed": not failed,
        "data_version": manifest["data_version"],
        "counts": {s: dict(zip(classes, counts[s], strict=True)) for s in SPLITS},
        "checks": checks,
        "failures": [f"{c['scope']}: {c['check']}: {c['message']}" for c in failed],
    }
