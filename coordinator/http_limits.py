"""HTTP limits for the coordinator's servers (the admin API and the fleet gateway): a deadline for
reading each request, so a connection that never finishes its request (slowloris) is closed.

uvicorn times out only idle keep-alive connections after a response: a connection that sends a
partial request line, headers slowly, or a body that never ends stays open forever.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)

MAX_REQUEST_HEAD_BYTES = 16 * 1024  # request line and headers (h11 answers 400 above it)


class RequestReadTimeoutProtocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for reading each request in full.

    uvicorn times out only idle keep-alive connections after a response: a connection that sends a
    partial request line, headers slowly, or a body that never ends stays open forever (slowloris).
    Here each request, head and body, must have arrived within ``read_timeout_s`` of the connection
    opening or of the previous response; otherwise the connection is closed. Trickling bytes does not
    extend the deadline. Time the application spends on a request that arrived does not count.
    :func:`request_read_timeout_protocol` makes one with a given timeout.
    """

    read_timeout_s: float = 30.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._read_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_read_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_read_deadline()  # the next request on this connection gets its own deadline

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_read_deadline()
        super().connection_lost(exc)

    def _arm_read_deadline(self) -> None:
        self._cancel_read_deadline()
        if not self.transport.is_closing():
            self._read_deadline = self.loop.call_later(self.read_timeout_s, self._read_timed_out)

    def _cancel_read_deadline(self) -> None:
        if self._read_deadline is not None:
            self._read_deadline.cancel()
            self._read_deadline = None

    def _read_timed_out(self) -> None:
        self._read_deadline = None
        # IDLE: no complete request head yet; SEND_BODY: the body is not complete. DONE: the app has it.
        if self.conn.their_state in (h11.IDLE, h11.SEND_BODY) and not self.transport.is_closing():
            log.info("closing the connection from %s: no complete request within %.3g s",
                     self.client[0] if self.client else "?", self.read_timeout_s)
            self.transport.close()


def request_read_timeout_protocol(timeout_s: float) -> type[RequestReadTimeoutProtocol]:
    """A :class:`RequestReadTimeoutProtocol` class with ``timeout_s`` (uvicorn takes a class as ``http``)."""
    return type("RequestReadTimeoutProtocol", (RequestReadTimeoutProtocol,), {"read_timeout_s": timeout_s})


