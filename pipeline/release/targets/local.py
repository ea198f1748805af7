"""The default target: tollgate's own server. It follows @champion by itself, and every promotion reloads and
verifies the checkout's server and waits for the replicas, so there is nothing more to hand over."""

from __future__ import annotations

from pipeline.release.targets.base import Target


class LocalTarget(Target):
    name = "local"
    title = "tollgate serve"
