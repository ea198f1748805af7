"""A daemon thread draining a bounded queue, for work the server does beside requests (live sampling, the
shadow challenger): handing it an item never waits, and a full queue says so for the caller to count."""

from __future__ import annotations

import queue
import threading

STOP = object()


class Worker:
    def __init__(self, size: int, name: str):
        self.queue: queue.Queue = queue.Queue(maxsize=size)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def hand(self, item) -> bool:
        """Queue `item` without waiting; False when the queue is full (the item is dropped)."""
        try:
            self.queue.put_nowait(item)
        except queue.Full:
            return False
        return True

    def next(self, timeout: float):
        """The next item, None after `timeout` seconds without one, or STOP."""
        try:
            return self.queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def close(self, timeout: float = 5.0) -> None:
        """Let the thread finish what it holds and stop."""
        try:
            self.queue.put(STOP, timeout=timeout)
        except queue.Full:
            return
        self._thread.join(timeout)

    def _run(self) -> None:
        raise NotImplementedError
