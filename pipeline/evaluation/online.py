"""The online gate, at promote: with `promote.shadow_min_requests`, what the candidate did in shadow on
live traffic beside the champion decides whether it may move. A gate that cannot compute its figure
refuses, saying why: it never passes a candidate it could not judge."""

from __future__ import annotations


def online_gate(seen: dict, version: str, needed: int, most: float) -> str | None:
    """With `promote.shadow_min_requests` (`needed`), the candidate must have run in shadow on that many
    live images (`seen`, the shadow report of it) and disagreed with the champion on at most
    `promote.shadow_max_disagreement` (`most`) of them, the images it failed on counted as disagreeing.
    Returns why it may not move, or None."""
    if needed == 0:
        return None
    if seen["images"] < needed:
        damaged = (
            f"; {len(seen['damaged_shards'])} damaged shard(s) skipped" if seen.get("damaged_shards") else ""
        )
        return (
            f"online gate: v{version} has run in shadow on {seen['images']} live images, "
            f"promote.shadow_min_requests needs {needed} (serve.shadow on, then promote again){damaged}"
        )
    share = seen.get("disagreement")
    if share is None:
        return (
            f"online gate: v{version}'s disagreement cannot be computed from its shadow records; not promoted"
        )
    if share > most:
        errors = f" ({seen['errors']} of {seen['images']} failed)" if seen.get("errors") else ""
        return (
            f"online gate: v{version} disagrees with the champion on {share:.3f} of its shadow images"
            f"{errors}, more than promote.shadow_max_disagreement {most}"
        )
    return None
