"""The answers of the last requests while a canary is loaded, champion's and canary's alike: what a rollout's
analysis reads for one step's window (`GET /admin/canary/window?since=`), joined with the labels that
`/feedback` brings for them.

A bounded ring (RECENT requests), kept in the process: a step's window is read well before it turns over
at the request rates one server takes (each rollout step reads it at its end), and a window lost with a
server restart only means the step waits for new traffic."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field

RECENT = 100_000


@dataclass(slots=True)
class Answered:
    t: float
    variant: str
    version: str
    latency_ms: float
    error: bool
    confidence: float = 0.0
    predicted: tuple[str, ...] = ()  # class of each image of the request
    correct: dict[int, bool] = field(default_factory=dict)  # image index -> its label was the prediction

    def row(self, rid: str) -> dict:
        right = next(iter(self.correct.values()), None)
        return {
            "t": self.t,
            "request_id": rid,
            "variant": self.variant,
            "version": self.version,
            "latency_ms": round(self.latency_ms, 3),
            "error": self.error,
            "confidence": round(self.confidence, 6),
            "correct": right,
        }


class Recent:
    def __init__(self, size: int = RECENT):
        self.size = size
        self._answers: OrderedDict[str, Answered] = OrderedDict()
        self._lock = threading.Lock()  # feedback labels arrive from worker threads

    def record(self, rid: str, answered: Answered) -> None:
        with self._lock:
            self._answers[rid] = answered
            self._answers.move_to_end(rid)
            if len(self._answers) > self.size:
                self._answers.popitem(last=False)

    def label(self, rid: str, item: int, label: str) -> bool:
        """Join a feedback label to the request it is for; False when the request is not kept."""
        with self._lock:
            answered = self._answers.get(rid)
            if answered is None or answered.error or item >= len(answered.predicted):
                return False
            answered.correct[item] = answered.predicted[item] == label
            return True

    def since(self, t: float) -> list[dict]:
        with self._lock:
            return [a.row(rid) for rid, a in self._answers.items() if a.t >= t]

    def clear(self) -> None:
        with self._lock:
            self._answers.clear()
