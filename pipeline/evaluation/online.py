"""The online gate, at promote: with `promote.shadow_min_requests`, what the candidate did in shadow on
live traffic beside the champion decides whether it may move."""

from __future__ import annotations


def online_gate(seen: dict, version: str, needed: int, most: float) -> str | None:
    """With `promote.shadow_min_requests` (`needed`), the candidate must have run in shadow on that many
    live images (`seen`, the shadow report of it) and disagreed with the champion on at most
    `promote.shadow_max_disagreement` (`most`) of them. Returns why it may not move, or None."""
    if needed == 0:
        return None
    if seen["images"] < needed:
        return (
            f"online gate: v{version} has run in shadow on {seen['images']} live images, "
            f"promote.shadow_min_requests needs {needed} (serve.shadow on, then promote again)"
        )
    if seen["disagreement"] is None or seen["disagreement"] > most:
        return (
            f"online gate: v{version} disagrees with the champion on {seen['disagreement']:.3f} of its "
            f"shadow images, more than promote.shadow_max_disagreement {most}"
        )
    return None
