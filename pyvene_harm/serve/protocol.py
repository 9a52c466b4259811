"""HTTP/1.1 with a deadline on request headers: a client that connects and trickles its headers
one byte at a time (slowloris) gets 408 and is disconnected, rather than holding a connection.
The concurrency limit is answered in OpenAI's error shape too (uvicorn's own 503 is plain text),
and a request cut at shutdown is logged in one line, not as an exception with a traceback.

uvicorn bounds the idle time between requests (``timeout_keep_alive``) but not the time a client
takes to send a request's headers. :func:`header_deadline_protocol` subclasses uvicorn's h11
protocol with a timer armed when a connection opens and when the first bytes of a later request
arrive, and cleared once a complete request head has arrived; idle keep-alive connections are
uvicorn's to close. The body has its own deadline in the app
(``Limits.read_timeout_s``).
"""

from __future__ import annotations

import asyncio
import json
import logging

from uvicorn.protocols.http.h11_impl import H11Protocol

from .errors import error_body

__all__ = ["header_deadline_protocol"]

_log = logging.getLogger("uvicorn.error")


def header_deadline_protocol(timeout_s: float) -> type[asyncio.Protocol]:
    """An h11 protocol class for ``uvicorn.run(http=...)`` that answers 408 to a request whose
    headers have not all arrived ``timeout_s`` seconds after the connection opened (or after
    the request's first bytes, on a kept-alive connection)."""
    body = json.dumps(error_body(f"the request headers did not arrive within {timeout_s:g} s (--read-timeout)",
                                 code="request_timeout")).encode()
    response = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
                b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)

    busy = json.dumps(error_body("the server holds as many connections and requests as it takes "
                                 "(--limit-concurrency): retry later", type="server_error",
                                 code="server_busy")).encode()
    stopping = json.dumps(error_body("the server was stopped before this request was answered "
                                     "(--graceful-shutdown-timeout): retry on a running server",
                                     type="server_error", code="server_shutting_down")).encode()

    class HeaderDeadlineH11(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None
        shutting_down = False

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            # uvicorn answers an exceeded --limit-concurrency with a plain-text 503; every answer of
            # this server is an OpenAI error object, so the limit is checked here instead, the same way
            limit, self.limit_concurrency = self.limit_concurrency, None
            app, protocol = self.app, self

            async def guarded(scope, receive, send):
                # as uvicorn counts: connections with this one, tasks before this request's own
                if limit is not None and scope["type"] == "http" and (len(protocol.connections) >= limit
                                                                       or len(protocol.tasks) > limit):
                    await send({"type": "http.response.start", "status": 503, "headers": [
                        (b"content-type", b"application/json"), (b"content-length", str(len(busy)).encode()),
                        (b"connection", b"close")]})
                    await send({"type": "http.response.body", "body": busy, "more_body": False})
                    return
                started = False

                async def tracked(message):
                    nonlocal started
                    started = started or message["type"] == "http.response.start"
                    await send(message)

                try:
                    await app(scope, receive, tracked)
                except asyncio.CancelledError:
                    if not protocol.shutting_down:
                        raise
                    # uvicorn cancels what is still running once --graceful-shutdown-timeout is over and
                    # would log the cancellation as "Exception in ASGI application" with a traceback and
                    # answer a plain-text 500: it is the shutdown the operator asked for, so one line says
                    # what was cut and a request not yet answered gets a 503 in OpenAI's shape
                    _log.warning("a request still in hand was cut at shutdown (--graceful-shutdown-timeout)")
                    if not started:
                        await send({"type": "http.response.start", "status": 503, "headers": [
                            (b"content-type", b"application/json"),
                            (b"content-length", str(len(stopping)).encode()), (b"connection", b"close")]})
                        await send({"type": "http.response.body", "body": stopping, "more_body": False})

            self.app = guarded

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(timeout_s, self._expire)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _expire(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing():
                self.transport.write(response)
                self.transport.close()

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def shutdown(self) -> None:
            self.shutting_down = True  # uvicorn's server calls this on every connection as it stops
            super().shutdown()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def handle_events(self) -> None:
            cycle = self.cycle
            super().handle_events()
            if self.cycle is not cycle:  # a whole request head arrived and a cycle began
                self._disarm()

        def data_received(self, data: bytes) -> None:
            # the first bytes of a request after an idle keep-alive: its head is now on the clock
            if self._header_timer is None and (self.cycle is None or self.cycle.response_complete):
                self._arm()
            super().data_received(data)

    return HeaderDeadlineH11
