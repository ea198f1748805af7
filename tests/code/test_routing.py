"""Canary routing (pipeline/serving/routing.py): the share follows the weight, a key keeps its variant
within a step, a key on the canary stays there as the weight rises, and replicas agree (no process seed)."""

from __future__ import annotations

import subprocess
import sys

from pipeline.serving.routing import KEY_HEADER, bucket, to_canary

KEYS = [f"user-{i}" for i in range(20_000)]


def _share(weight: float) -> float:
    return sum(to_canary({KEY_HEADER: k}, "", weight) for k in KEYS) / len(KEYS)


def test_the_share_of_keys_follows_the_weight():
    for weight in (0, 5, 25, 50, 100):
        assert abs(_share(weight) - weight / 100) < 0.01, weight


def test_a_key_keeps_its_variant_and_stays_on_the_canary_as_the_weight_rises():
    at_5 = {k for k in KEYS if to_canary({KEY_HEADER: k}, "", 5)}
    at_25 = {k for k in KEYS if to_canary({KEY_HEADER: k}, "", 25)}
    assert at_5 <= at_25 and at_5 == {k for k in KEYS if to_canary({KEY_HEADER: k}, "", 5)}
    assert to_canary({}, "request-id", 100) and not to_canary({}, "request-id", 0)


def test_buckets_are_the_same_in_another_process():
    code = "from pipeline.serving.routing import bucket; print([bucket(f'user-{i}') for i in range(50)])"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert other.strip() == str([bucket(f"user-{i}") for i in range(50)])
