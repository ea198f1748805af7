"""Connection deadlines that uvicorn lacks: one for the request head, one for the request body.

uvicorn closes idle keep-alive connections, but waits forever for a client that sends its request a byte at
a time (slowloris): a few hundred of them hold the server's file descriptors and later clients are reset.
This is uvicorn's own HTTP protocol (httptools) with two timers: the head must be complete within
`serve.header_timeout_s` of the connection opening (or of the next request beginning), and the body within
`serve.body_timeout_s` of the head. A late head gets 408 and the connection closes; so does a late body,
unless the application already answered. `serve` imports this module only when it starts a server.
"""

from __future__ import annotations

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

REQUEST_TIMEOUT = b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"


class TimedHttpToolsProtocol(HttpToolsProtocol):
    header_timeout = 10.0  # replaced per server by `timed_protocol`
    body_timeout = 30.0
    _deadline = None

    def _arm(self, seconds: float, part: str) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, self._expire, part)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self, part: str) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if part == "head" or (cycle is not None and not cycle.response_started):
            if cycle is not None:
                cycle.disconnected = True  # whatever the application sends later is dropped
            self.transport.write(REQUEST_TIMEOUT)
        self.transport.close()

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm(self.header_timeout, "head")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._deadline is None:  # the first request's head deadline runs from the connection
            self._arm(self.header_timeout, "head")

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        self._arm(self.body_timeout, "body")

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)


def timed_protocol(header_timeout: float, body_timeout: float) -> type:
    """uvicorn's `http` protocol class with these two deadlines (seconds)."""
    return type(
        "TimedHttpToolsProtocol",
        (TimedHttpToolsProtocol,),
        {"header_timeout": header_timeout, "body_timeout": body_timeout},
    )
