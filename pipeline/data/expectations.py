"""validate: a Great Expectations suite over the prepared data, built from params (reviewed as code).

GX sees four kinds of table: one row per source file (folders only: readable, really an image, channels,
size), one row per image for each split (shape, dtype, pixel values, label, content hash), one row per
(split, class) with its image count, zero-filled so an absent class is a visible row, and one row per class
(balance, classes seen in test but never in training). Every expectation carries the id of the check it
implements (`validate.warn_only` lists the ids that only warn), and the result is data: each check with its
outcome and a sentence naming the files, images or classes at fault. GX renders the same results as Data
Docs HTML.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from pipeline.core.config import ValidateConfig
from pipeline.data import arrays
from pipeline.data.prepared import (
    FILES,
    SPLITS,
    image_hashes,
    load_split,
    read_manifest,
    splits_of,
)

DOCS_INDEX = "index.html"


def _pixel_facts(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Per image: lowest and highest pixel, all finite, content hash; read 64 MB at a time, so a split
    far larger than memory (a memory map) is streamed, never held."""
    n, width = len(x), int(np.prod(x.shape[1:]))  # explicit width: an empty split has no -1 to infer
    lo, hi, finite, hashes = np.zeros(n), np.zeros(n), np.ones(n, dtype=bool), []
    for start, part in arrays.blocks(x):
        flat = part.reshape(len(part), width)
        if width:
            lo[start : start + len(part)] = flat.min(axis=1)
            hi[start : start + len(part)] = flat.max(axis=1)
        if flat.dtype.kind == "f":
            finite[start : start + len(part)] = np.isfinite(flat).all(axis=1)
        hashes += image_hashes(part)
    return lo, hi, finite, hashes


def image_table(x: np.ndarray, y: np.ndarray, names: list[str]):
    import pandas as pd

    n = len(x)
    lo, hi, finite, hashes = _pixel_facts(x)
    return pd.DataFrame(
        {
            "name": names,
            "height": np.full(n, x.shape[1]),
            "width": np.full(n, x.shape[2]),
            "channels": np.full(n, x.shape[3]),
            "dtype": [str(x.dtype)] * n,
            "finite": finite,
            "pixel_min": np.nan_to_num(lo.astype(np.float64), nan=-1.0),
            "pixel_max": np.nan_to_num(hi.astype(np.float64), nan=256.0),
            "constant": lo == hi,
            "label": y,
            "hash": hashes,
        }
    )


def count_table(counts: dict[str, list[int]], classes: list[str]):
    import pandas as pd

    rows = [(s, c, n) for s, per_class in counts.items() for c, n in zip(classes, per_class, strict=True)]
    return pd.DataFrame(rows, columns=["split", "class", "count"])


def class_table(counts: dict[str, list[int]], classes: list[str]):
    import pandas as pd

    frame = pd.DataFrame({"class": classes, **{s: counts[s] for s in SPLITS}})
    largest = max(counts["train"], default=0)
    frame["imbalance"] = [largest / n if n else float("inf") for n in counts["train"]]
    frame["unseen_in_train"] = (frame["test"] > 0) & (frame["train"] == 0)
    return frame


def _expect(gx, kind: str, check: str, title: str, **kwargs):
    exp = getattr(gx.expectations, kind)(**kwargs)
    exp.meta = {"check": check, "title": title}
    return exp


def _file_checks(gx, cfg: ValidateConfig, channels: int | None) -> list:
    checks = [
        _expect(gx, "ExpectColumnValuesToBeInSet", "non_image_files", "only image files in class folders",
                column="kind", value_set=["image"]),
        _expect(gx, "ExpectColumnValuesToBeInSet", "unreadable_files", "every image file decodes",
                column="unreadable", value_set=[False]),
        _expect(gx, "ExpectColumnValuesToBeBetween", "image_size", "image width within bounds",
                column="width", min_value=cfg.min_image_side, max_value=cfg.max_image_side),
        _expect(gx, "ExpectColumnValuesToBeBetween", "image_size", "image height within bounds",
                column="height", min_value=cfg.min_image_side, max_value=cfg.max_image_side),
    ]  # fmt: skip
    if channels is not None:  # images are used as found: they must agree (set data.channels to convert)
        checks.append(
            _expect(gx, "ExpectColumnValuesToBeInSet", "channels", f"every image has {channels} channel(s)",
                    column="channels", value_set=[channels])
        )  # fmt: skip
    return checks


def _image_checks(gx, split: str, cfg: ValidateConfig, shape: list[int], n_classes: int):
    h, w, c = shape
    E = "ExpectColumnValuesToBeInSet"
    checks = [
        _expect(gx, E, "pixel_values", "dtype is uint8", column="dtype", value_set=["uint8"]),
        _expect(gx, E, "pixel_values", "no NaN or inf pixels", column="finite", value_set=[True]),
        _expect(gx, "ExpectColumnValuesToBeBetween", "pixel_values", "pixel range (min)",
                column="pixel_min", min_value=cfg.pixel_min),
        _expect(gx, "ExpectColumnValuesToBeBetween", "pixel_values", "pixel range (max)",
                column="pixel_max", max_value=cfg.pixel_max),
        _expect(gx, E, "shape", "image height", column="height", value_set=[h]),
        _expect(gx, E, "shape", "image width", column="width", value_set=[w]),
        _expect(gx, E, "shape", "channel count", column="channels", value_set=[c]),
        _expect(gx, E, "labels", "labels in class list", column="label", value_set=list(range(n_classes))),
        _expect(gx, E, "constant_images", "no blank (constant) images", column="constant", value_set=[False]),
        _expect(gx, "ExpectTableRowCountToBeBetween", "min_images",
                f"at least {cfg.min_train_images if split == 'train' else 1} images",
                min_value=cfg.min_train_images if split == "train" else 1),
        _expect(gx, E, "duplicates", f"at most {cfg.max_duplicate_fraction:.0%} duplicate images",
                column="duplicate", value_set=[False], mostly=1.0 - cfg.max_duplicate_fraction),
    ]  # fmt: skip
    if split != "train":
        earlier = {"val": "train", "test": "train or val"}.get(split, "train, val or test")
        checks.append(
            _expect(gx, E, "leakage", f"no images shared with {earlier}", column="leaked", value_set=[False])
        )
    return checks


def _count_checks(gx, cfg: ValidateConfig) -> list:
    return [
        _expect(gx, "ExpectColumnValuesToBeBetween", "min_per_class",
                f"every class has >= {cfg.min_per_class} images in every split",
                column="count", min_value=cfg.min_per_class)
    ]  # fmt: skip


def _class_checks(gx, cfg: ValidateConfig) -> list:
    return [
        _expect(gx, "ExpectColumnValuesToBeBetween", "class_imbalance",
                f"largest class at most {cfg.max_class_ratio:g}x any other (train)",
                column="imbalance", max_value=cfg.max_class_ratio),
        _expect(gx, "ExpectColumnValuesToBeInSet", "unseen_test_classes", "every test class is in train",
                column="unseen_in_train", value_set=[False]),
    ]  # fmt: skip


def _names(frame, rows: list[int], limit: int = 5) -> str:
    names = [str(frame["name"].iloc[i]) for i in rows[:limit]]
    return ", ".join(names) + (f" and {len(rows) - limit} more" if len(rows) > limit else "")


def _explain(result, frame) -> str:
    """One sentence naming the fault and the files, images or classes at fault."""
    r = dict(result.result)
    kw = result.expectation_config.kwargs
    check = result.expectation_config.meta["check"]
    rows = [int(i) for i in r.get("unexpected_index_list") or []]
    if check == "min_images":
        return f"{r.get('observed_value')} images, fewer than {kw['min_value']}: the dataset is empty or tiny"
    if check == "duplicates":
        dup = frame[frame["hash"].duplicated(keep=False)]
        groups = [" = ".join(g["name"].astype(str)[:3]) for _, g in dup.groupby("hash", sort=False)][:3]
        return f"{len(rows)} images ({len(rows) / len(frame):.1%}) repeat another, e.g. {'; '.join(groups)}"
    if check == "min_per_class":
        bad = frame[frame["count"] < kw["min_value"]]
        return "too few images: " + ", ".join(
            f"class {row['class']} has {row['count']} in {row['split']}" for _, row in bad.iterrows()
        )
    if check == "class_imbalance":
        largest = frame.loc[frame["train"].idxmax()]
        bad = frame.iloc[rows]
        return f"class {largest['class']} has {largest['train']} training images; " + ", ".join(
            f"class {row['class']} only {row['train']}" for _, row in bad.iterrows()
        )
    if check == "unseen_test_classes":
        return "classes in test but absent from train: " + ", ".join(frame["class"].iloc[rows].astype(str))
    if check in ("unreadable_files", "non_image_files"):
        bad = frame.iloc[rows]
        listed = "; ".join(f"{p} ({e})" for p, e in zip(bad["name"], bad["error"], strict=True))
        return f"{len(rows)} files: {listed[:600]}"
    column = kw["column"]
    values = sorted({str(frame[column].iloc[i]) for i in rows[:50]})[:5]
    what = {
        "leakage": "images also in an earlier split (identical content)",
        "constant_images": "blank images (every pixel the same value)",
        "labels": f"labels outside the class list ({', '.join(values)})",
        "channels": f"images with other channel counts ({', '.join(values)})",
    }.get(check, f"rows with unexpected {column} ({', '.join(values)})")
    return f"{len(rows)} {what}: {_names(frame, rows)}"


def _tables(prepared: Path, manifest: dict) -> tuple[list[tuple[str, object, str]], dict]:
    """(scope, frame, suite kind) for every table, and the per-split class counts."""
    import pandas as pd

    classes = manifest["classes"]
    files = None
    if "files" in manifest:
        files = pd.read_csv(prepared / FILES, dtype={"error": "string", "path": str, "class": str})
        files["unreadable"] = (files["kind"] == "image") & files["error"].notna()
        files["name"] = files["path"]
    tables, counts, seen = [], {}, set()
    if files is not None:
        tables.append(("files", files, "files"))
    for split in splits_of(manifest):
        part = load_split(prepared, split)
        names = [f"{split}[{i}]" for i in range(len(part.x))]
        if files is not None:  # files name their images; other images (feedback beside digits) keep split[i]
            used = files[(files["split"] == split) & (files["index"] >= 0)]
            for index, path in zip(used["index"], used["path"], strict=True):
                names[int(index)] = path
        frame = image_table(part.x, part.y, names)
        # A column, not a value set: GX copies an expectation's arguments many times, and a set of every
        # training image's hash made that dominate the run (minutes on MNIST).
        frame["leaked"] = frame["hash"].isin(seen)
        frame["duplicate"] = frame["hash"].duplicated()
        seen.update(frame["hash"])
        tables.append((split, frame, "images"))
        valid = part.y[(part.y >= 0) & (part.y < len(classes))]
        counts[split] = np.bincount(valid, minlength=len(classes)).tolist()
    # The feedback slice holds what users labelled: not every class need be in it.
    tables.append(("all splits", count_table({s: counts[s] for s in SPLITS}, classes), "counts"))
    tables.append(("classes", class_table(counts, classes), "classes"))
    return tables, counts


def _context(docs_dir: str | Path | None):
    """An ephemeral GX context (nothing written but the Data Docs site, when `docs_dir` is given)."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    if docs_dir is not None:
        ctx.add_data_docs_site(
            "tollgate",
            {
                "class_name": "SiteBuilder",
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
                "store_backend": {
                    "class_name": "TupleFilesystemStoreBackend",
                    "base_directory": str(Path(docs_dir).resolve()),
                },
            },
        )
    return ctx


def _expectations(gx, kind: str, scope: str, cfg: ValidateConfig, manifest: dict) -> list:
    if kind == "files":
        own = None if manifest.get("converted_channels") else manifest["image_shape"][2]
        return _file_checks(gx, cfg, own)
    if kind == "images":
        return _image_checks(gx, scope, cfg, manifest["image_shape"], len(manifest["classes"]))
    return _count_checks(gx, cfg) if kind == "counts" else _class_checks(gx, cfg)


def _validate(gx, ctx, source, scope: str, frame, expectations: list, cfg: ValidateConfig) -> list[dict]:
    """One table through its suite: a row per expectation, with a sentence naming what is at fault."""
    name = scope.replace(" ", "_")
    suite = ctx.suites.add(gx.ExpectationSuite(name=name, expectations=expectations))
    batch = source.add_dataframe_asset(name).add_batch_definition_whole_dataframe("whole")
    definition = ctx.validation_definitions.add(gx.ValidationDefinition(name=name, data=batch, suite=suite))
    result = definition.run(
        batch_parameters={"dataframe": frame}, result_format={"result_format": "COMPLETE"}
    )
    return [
        {
            "id": res.expectation_config.meta["check"],
            "scope": scope,
            "check": res.expectation_config.meta["title"],
            "expectation": res.expectation_config.type,
            "success": bool(res.success),
            "blocking": res.expectation_config.meta["check"] not in cfg.warn_only,
            "message": "" if res.success else _explain(res, frame),
        }
        for res in result.results
    ]


def run_suite(prepared_dir: str | Path, cfg: ValidateConfig, docs_dir: str | Path | None = None) -> dict:
    """Validate the prepared data: the report (`passed`, every check, failures and warnings); never raises
    on bad data. With `docs_dir`, GX also writes its Data Docs site there."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx

    prepared = Path(prepared_dir)
    manifest = read_manifest(prepared)
    tables, counts = _tables(prepared, manifest)
    ctx = _context(docs_dir)
    source = ctx.data_sources.add_pandas("tollgate")
    checks = []
    for scope, frame, kind in tables:
        expectations = _expectations(gx, kind, scope, cfg, manifest)
        checks += _validate(gx, ctx, source, scope, frame, expectations, cfg)
    if docs_dir is not None:
        ctx.build_data_docs()
    failed = [c for c in checks if not c["success"]]
    line = "{scope}: {check}: {message}".format
    return {
        "passed": not any(c["blocking"] for c in failed),
        "data_version": manifest["data_version"],
        "counts": {s: dict(zip(manifest["classes"], n, strict=True)) for s, n in counts.items()},
        "checks": checks,
        "failures": [line(**c) for c in failed if c["blocking"]],
        "warnings": [line(**c) for c in failed if not c["blocking"]],
    }
