"""The fleet gateway: the only Flower port other sites reach.

``flower-superlink`` 1.41 serves three HTTP APIs on one port: the Fleet API (SuperNodes, ``POST
/v1/fleet/*``), the Control API (``/v1/control/*``: start and stop runs, register SuperNodes; no
authentication in open-source Flower) and the runtime API (``/v1/runtime/*``, the ServerApp). So
the SuperLink listens on 127.0.0.1 only, and ``fedtune coordinator serve`` runs this reverse proxy
on the public fleet address (:func:`start_fleet_gateway`):

* ``POST /v1/fleet/<name>`` (``name`` of ``[a-z-]``) is forwarded to the SuperLink on loopback with
  its body and end-to-end headers (content type, Flower's version headers, and the
  ``flwr-public-key`` / ``flwr-timestamp`` / ``flwr-signature`` headers its SuperNode
  authentication checks); the SuperLink's status, headers and body come back unchanged.
* Everything else (the Control and runtime APIs, ``GET``, ``/docs``, ...) is answered 404 here,
  without a byte reaching the SuperLink.
* Bodies over :data:`MAX_FLEET_BODY_BYTES` get 413; a SuperLink that does not answer, 502 (504 on
  a timeout).

TLS: with TLS configured the gateway terminates it with the coordinator's certificate (SuperNodes
verify it with the CA, ``--root-certificates``), and the SuperLink keeps TLS on loopback too:
``flower-superlink`` refuses ``--enable-supernode-auth`` with ``--insecure``, and the ServerApp and
``flwr`` CLI dial it directly. The gateway verifies the SuperLink's certificate with the same CA
(the certificate names 127.0.0.1, see :func:`fedtune.coordinator.superlink.start_superlink`).

:class:`ThreadedServer` runs a uvicorn server in a daemon thread (the gateway, and ``serve``'s admin
API) and stops it without waiting out idle TLS keep-alive connections.
"""

from __future__ import annotations

import logging
import re
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import uvicorn
from starlette.requests import ClientDisconnect, Request
from starlette.types import ASGIApp, Receive, Scope, Send

from fedtune.coordinator.http_limits import MAX_REQUEST_HEAD_BYTES, request_read_timeout_protocol
from fedtune.coordinator.tls import TlsFiles

log = logging.getLogger(__name__)

MAX_FLEET_BODY_BYTES = 256 * 1024 * 1024
# Each fleet request must arrive in full within this many seconds (an adapter upload over a slow link
# included); a connection that never finishes its request is closed.
FLEET_READ_TIMEOUT_S = 120.0
"""The largest request body forwarded; Flower's object pushes are chunks far below it."""
UPSTREAM_TIMEOUT = httpx.Timeout(300.0, connect=5.0)
FLEET_PATH = re.compile(r"^/v1/fleet/[a-z-]+$")

# RFC 9110 7.6.1 hop-by-hop headers, plus those the two HTTP connections set for themselves
# (host, content-length) or that say who the client is: the SuperLink's uvicorn trusts
# X-Forwarded-* from 127.0.0.1, so a client's own must never pass; the gateway sets X-Forwarded-For.
_NOT_FORWARDED = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"proxy-connection", b"te",
    b"trailer", b"trailers", b"transfer-encoding", b"upgrade", b"expect", b"host", b"content-length",
    b"forwarded", b"x-forwarded-for", b"x-forwarded-host", b"x-forwarded-proto", b"x-forwarded-port",
    b"x-real-ip"})
# the gateway's own server sets these; the SuperLink's would be duplicates
_NOT_RETURNED = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-connection", b"te", b"trailer", b"trailers",
    b"transfer-encoding", b"upgrade", b"server", b"date"})


def _end_to_end(raw: list[tuple[bytes, bytes]], dropped: frozenset[bytes]) -> list[tuple[bytes, bytes]]:
    """The headers of ``raw`` that belong to the message, not the connection (RFC 9110 7.6.1)."""
    named = {token.strip().lower() for name, value in raw if name.lower() == b"connection"
             for token in value.split(b",")}
    return [(name, value) for name, value in raw if name.lower() not in dropped and name.lower() not in named]


async def _answer(send: Send, status: int, text: str) -> None:
    body = text.encode() + b"\n"
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class FleetGateway:
    """ASGI app: forwards the Fleet API to a SuperLink on 127.0.0.1:``superlink_port``, nothing else.

    Args:
        superlink_port: the SuperLink's loopback port.
        ca_cert: the CA that signed the SuperLink's certificate; None when the SuperLink runs
            ``--insecure`` (plain HTTP on loopback).
        max_body_bytes: larger request bodies get 413.
        read_timeout_s: each request must arrive in full within this (else the connection is closed).
    """

    def __init__(self, superlink_port: int, *, ca_cert: Path | None = None,
                 max_body_bytes: int = MAX_FLEET_BODY_BYTES) -> None:
        self.upstream = f"{'https' if ca_cert else 'http'}://127.0.0.1:{superlink_port}"
        self.ca_cert = ca_cert
        self.max_body_bytes = max_body_bytes
        self._client: httpx.AsyncClient | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            await self._http(Request(scope, receive), send)
        else:  # websocket: refuse the handshake
            await send({"type": "websocket.close", "code": 1008})

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                verify = ssl.create_default_context(cafile=self.ca_cert) if self.ca_cert else False
                # trust_env off: an HTTP(S)_PROXY in the environment must not divert loopback traffic
                self._client = httpx.AsyncClient(base_url=self.upstream, verify=verify, timeout=UPSTREAM_TIMEOUT,
                                                 follow_redirects=False, trust_env=False)
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._client is not None:
                    await self._client.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, request: Request, send: Send) -> None:
        client = request.client.host if request.client else "?"
        path = request.scope["path"]  # percent-decoded: "%2e%2e/" cannot slip past the pattern
        if request.method != "POST" or not FLEET_PATH.match(path):
            log.info("refused %s %r from %s (only POST /v1/fleet/* is forwarded)", request.method, path[:200],
                     client)
            await _answer(send, 404, "not found")
            return
        try:
            body = await self._read_body(request)
        except ClientDisconnect:
            log.info("%s from %s: the client left before sending its body", path, client)
            return
        if body is None:
            log.warning("refused %s from %s: body over %d bytes", path, client, self.max_body_bytes)
            await _answer(send, 413, f"request body over {self.max_body_bytes} bytes")
            return
        assert self._client is not None, "the gateway's lifespan did not start"
        headers = [*_end_to_end(request.headers.raw, _NOT_FORWARDED), (b"x-forwarded-for", client.encode())]
        upstream_request = self._client.build_request("POST", path, content=body, headers=headers)
        try:
            upstream = await self._client.send(upstream_request, stream=True)
        except httpx.TimeoutException as e:
            log.warning("SuperLink timed out on %s: %r", path, e)
            await _answer(send, 504, "the SuperLink did not answer in time")
            return
        except httpx.TransportError as e:
            log.warning("SuperLink unreachable for %s: %r", path, e)
            await _answer(send, 502, "the SuperLink is not reachable")
            return
        try:
            await send({"type": "http.response.start", "status": upstream.status_code,
                        "headers": _end_to_end(upstream.headers.raw, _NOT_RETURNED)})
            async for chunk in upstream.aiter_raw():  # raw: content-encoding passes through as sent
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        finally:
            await upstream.aclose()

    async def _read_body(self, request: Request) -> bytes | None:
        """The request body, or None when it is longer than ``max_body_bytes`` (read no further).

        Raises:
            ClientDisconnect: the client went away first.
        """
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            return None
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.max_body_bytes:
                return None
        return bytes(body)


@dataclass
class ThreadedServer:
    """A uvicorn server in a daemon thread: how ``serve`` runs the fleet gateway and the admin API.

    Its socket is bound by :meth:`start`, so a taken port fails in the caller; signals stay with the
    main thread (``serve`` handles SIGINT / SIGTERM and calls :meth:`stop`).
    """

    name: str
    host: str
    port: int
    tls: bool
    server: uvicorn.Server
    thread: threading.Thread

    @classmethod
    def start(cls, app: ASGIApp, *, name: str, host: str, port: int, tls: TlsFiles | None = None,
              ready_timeout_s: float = 15.0, **options: object) -> ThreadedServer:
        """Serve ``app`` on ``host:port`` (0: a free port; see ``port``), HTTPS with ``tls.cert``/``tls.key``
        when ``tls`` is given; ``options`` go to ``uvicorn.Config``.

        Raises:
            RuntimeError: the address cannot be bound, or the server did not start.
        """
        sock = _listen(name, host, port)
        config = uvicorn.Config(app, ssl_certfile=str(tls.cert) if tls else None,
                                ssl_keyfile=str(tls.key) if tls else None, **options)  # type: ignore[arg-type]
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name=name, daemon=True)
        thread.start()
        deadline = time.monotonic() + ready_timeout_s
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                server.should_exit = True
                sock.close()
                raise RuntimeError(f"the {name} on {host}:{port} did not start (see the log above)")
            time.sleep(0.05)
        return cls(name=name, host=host, port=sock.getsockname()[1], tls=tls is not None, server=server,
                   thread=thread)

    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"

    def wait(self) -> None:
        """Block until the server ends (signals still reach the main thread meanwhile).

        Sleeps and looks rather than ``Thread.join``: a signal handler that raises (``serve``'s SIGTERM)
        while ``join`` waits makes CPython 3.11 take the thread for stopped although it still runs
        (bpo-45274's clean-up), and :meth:`stop` would then not wait for the server's shutdown (its
        lifespan: the admin API's open refusal bursts are audited there).
        """
        while self.thread.is_alive():
            time.sleep(0.2)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop accepting, let requests in flight finish (up to ``timeout_s``), abort the idle connections
        left, and let the app's lifespan shut down.

        uvicorn would close idle keep-alive connections gracefully, which under TLS waits up to 30 s for
        each client's close_notify; an idle client (a SuperNode between calls, a pooled API client) never
        sends one.
        """
        server = self.server
        server.should_exit = True
        deadline = time.monotonic() + timeout_s

        def busy() -> bool:  # still accepting, or requests in flight
            return bool(server.server_state.tasks) or any(s.is_serving() for s in getattr(server, "servers", []))

        while self.thread.is_alive() and busy() and time.monotonic() < deadline:
            time.sleep(0.05)
        for connection in list(server.server_state.connections):  # uvicorn's protocols own .loop, .transport
            connection.loop.call_soon_threadsafe(connection.transport.abort)
        self.thread.join(max(deadline - time.monotonic(), 1.0))


def _listen(name: str, host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise RuntimeError(f"the {name} cannot listen on {host}:{port}: {e}") from e
    sock.listen(2048)
    return sock


def start_fleet_gateway(*, host: str, port: int, superlink_port: int, tls: TlsFiles | None = None,
                        max_body_bytes: int = MAX_FLEET_BODY_BYTES,
                        read_timeout_s: float = FLEET_READ_TIMEOUT_S) -> ThreadedServer:
    """Serve a :class:`FleetGateway` on ``host:port`` in a daemon thread.

    Args:
        host: the public fleet address ("0.0.0.0" to accept other sites).
        port: what SuperNodes dial; 0 picks a free one (see the returned ``port``).
        superlink_port: the SuperLink's port on 127.0.0.1.
        tls: the coordinator's TLS files: the gateway serves HTTPS with ``cert``/``key`` and verifies the
            SuperLink (which then runs with TLS too) with ``ca_cert``; None: plain HTTP on both hops.
        max_body_bytes: larger request bodies get 413.

    Returns:
        The running gateway (its bound port, :meth:`ThreadedServer.stop`).

    Raises:
        RuntimeError: the address cannot be bound, or the server did not start.
    """
    app = FleetGateway(superlink_port, ca_cert=tls.ca_cert if tls else None, max_body_bytes=max_body_bytes)
    # proxy_headers off: X-Forwarded-* from the internet says nothing; the SuperLink logs who connected here.
    return ThreadedServer.start(app, name="fleet gateway", host=host, port=port, tls=tls, lifespan="on",
                                log_level="warning", access_log=False, proxy_headers=False, server_header=False,
                                http=request_read_timeout_protocol(read_timeout_s), timeout_keep_alive=5,
                                h11_max_incomplete_event_size=MAX_REQUEST_HEAD_BYTES)
