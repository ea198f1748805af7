"""Which variant answers a request while a canary is loaded: a share `weight` (percent) of requests goes to
@canary, chosen by a hash of the request's routing key, so one caller (one key) sees one model within a
step, and a caller moved to the canary stays there as the weight rises (a key's bucket never changes).

The key is the client's `X-Tollgate-Route-Key` (a user or session id), else its request id: a client that
sends neither is routed per request."""

from __future__ import annotations

import hashlib

KEY_HEADER = "x-tollgate-route-key"
BUCKETS = 10_000  # weights to 0.01 %


def bucket(key: str) -> int:
    """The key's fixed place in 0..BUCKETS-1, the same on every replica (no per-process hash seed)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") % BUCKETS


def to_canary(headers, rid: str, weight: float) -> bool:
    """True when the request with these headers and id goes to the canary at `weight` percent."""
    if weight <= 0:
        return False
    return bucket(headers.get(KEY_HEADER) or rid) < round(weight * BUCKETS / 100)
