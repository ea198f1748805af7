"""What every serving target does when a version is promoted, rolled back or deployed to it.

`stage` runs before @champion moves and may refuse (TargetError): nothing has changed yet. `commit` runs
once the alias has moved and the checkout's server and the replicas serve the version; `abort` undoes a
stage whose alias move failed. The checkout's own `tollgate serve` and its replicas are not a target: every
promotion reloads and verifies them, whatever the target.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pipeline.core.config import Params
from pipeline.registry.store import Store
from pipeline.release.verify import Smoke


class TargetError(RuntimeError):
    """The target cannot take the version; the message says why."""


@dataclass
class Handover:
    """What a target prepared for one version, and (after `commit`) what it did."""

    target: str
    version: str
    summary: str = ""  # one line for the promotion's summary ("" when there is nothing beyond the alias)
    details: dict = field(default_factory=dict)  # what the promotion report keeps (a manifest, a command)
    held: dict = field(default_factory=dict, repr=False)  # the target's own state between stage and commit

    def record(self) -> dict:
        return {"target": self.target, "summary": self.summary, **self.details}


class Target:
    name = ""  # as params.yaml's promote.target names it
    title = ""  # as a message names it

    def __init__(self, store: Store, params: Params, root: Path):
        self.store, self.params, self.root = store, params, root

    def stage(self, version: str, smoke: Smoke) -> Handover:
        """Get ready to serve `version` (whose smoke images and expected classes are `smoke`)."""
        return Handover(self.name, version)

    def commit(self, handover: Handover) -> Handover:
        """The alias moved to the staged version: make the target serve it."""
        return handover

    def abort(self, handover: Handover) -> None:
        """The alias did not move: forget what `stage` prepared."""
