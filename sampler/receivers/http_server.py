"""The aiohttp server the HTTP receivers (OTLP/HTTP, Zipkin) share: lifecycle, bounded bodies, errors."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import zlib
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.typedefs import Middleware

from sampler.auth import Authenticator
from sampler.config import ReceiverSecurity
from sampler.errors import TailgateError
from sampler.receivers.common import Ingest
from sampler.sites import start_site
from sampler.tls import load_server_tls

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class RequestRejected(TailgateError):
    """A request answered with an error status before any span was buffered."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message


class HTTPReceiver(ABC):
    """An aiohttp server on `endpoint` whose routes hand spans to `ingest`.

    Subclasses add their routes in `routes`, wrapped with `tracked` so that shutdown lets requests in
    progress finish.
    """

    protocol: str
    label: str  # for logs, e.g. "OTLP/HTTP"
    # With `workers: N`, every worker listens on the same port (SO_REUSEPORT).
    reuse_port = False

    def __init__(
        self,
        endpoint: str,
        max_request_bytes: int,
        ingest: Ingest,
        shutdown_grace: float,
        security: ReceiverSecurity | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.security = security or ReceiverSecurity()
        self.max_request_bytes = max_request_bytes
        self.ingest = ingest
        self.shutdown_grace = shutdown_grace
        self.port: int | None = None
        self._runner: web.AppRunner | None = None
        self._in_flight = 0
        self._idle = asyncio.Event()

    @abstractmethod
    def routes(self, app: web.Application) -> None:
        """Add this receiver's routes to `app`."""

    def make_app(self) -> web.Application:
        # client_max_size bounds the body as sent; the decompressed size is checked separately.
        app = web.Application(client_max_size=self.max_request_bytes)
        if self.security.auth is not None:
            app.middlewares.append(
                self._authenticate(Authenticator(self.security.auth, f"{self.label} receiver"))
            )
        self.routes(app)
        return app

    def error_reply(self, rejected: RequestRejected, request: web.Request) -> web.Response:
        """The reply to a request refused before its handler ran: plain text by default."""
        return web.Response(status=rejected.status, text=rejected.message)

    def _authenticate(self, authenticator: Authenticator) -> Middleware:
        """A middleware answering 401 to requests without valid credentials, before their body is read."""

        @web.middleware
        async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
            reason = authenticator.refusal(request.headers.get)
            if reason is None:
                return await handler(request)
            self.ingest.refuse("unauthenticated")
            authenticator.log_refusal(request.remote or "unknown", reason)
            reply = self.error_reply(
                RequestRejected(401, "unauthenticated", f"unauthenticated: {reason}"), request
            )
            if authenticator.challenge is not None:
                reply.headers["WWW-Authenticate"] = authenticator.challenge
            return reply

        return authenticate

    async def start(self) -> None:
        host, _, port = self.endpoint.rpartition(":")
        security = self.security
        tls = None if security.tls is None else load_server_tls(security.tls, f"{self.label} receiver")
        # Decompression is done here, bounded, instead of by aiohttp's unbounded reader.
        runner = web.AppRunner(
            self.make_app(),
            auto_decompress=False,
            access_log=None,
            shutdown_timeout=self.shutdown_grace,
        )
        await runner.setup()
        site = web.TCPSite(
            runner,
            host.strip("[]"),
            int(port),
            reuse_address=True,
            reuse_port=self.reuse_port or None,
            ssl_context=None if tls is None else tls.context,
        )
        self.port = await start_site(runner, site)
        self._runner = runner
        mode = "plaintext" if tls is None else tls.mode
        log.info("%s receiver listening on %s:%s (%s)", self.label, host, self.port, mode)

    async def stop(self) -> None:
        """Stop accepting; requests in progress get `shutdown_grace` seconds to complete."""
        if self._runner is None:
            return
        # Close the listening sockets first: aiohttp's cleanup closes connections straight away, which
        # would cut off a request whose body is still arriving.
        for site in list(self._runner.sites):
            await site.stop()
        if self._in_flight:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.shutdown_grace):
                    await self._idle.wait()
        await self._runner.cleanup()
        self._runner = None

    def tracked(self, handler: Handler) -> Handler:
        """`handler`, counted as in flight while it runs."""

        async def run(request: web.Request) -> web.StreamResponse:
            self._in_flight += 1
            self._idle.clear()
            try:
                return await handler(request)
            finally:
                self._in_flight -= 1
                if not self._in_flight:
                    self._idle.set()

        return run

    async def read_body(self, request: web.Request) -> bytes:
        """The request body, decompressed per Content-Encoding, at most `max_request_bytes`; read once
        the gateway can take it (Ingest.admit)."""
        limit = self.max_request_bytes
        await self.ingest.admit()
        try:
            body = await read_all(request, limit)
        except web.HTTPRequestEntityTooLarge:
            raise RequestRejected(
                413, "too_large", f"request body exceeds max_request_bytes ({limit})"
            ) from None
        encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding in ("", "identity"):
            return body
        if encoding not in ("gzip", "deflate"):
            raise RequestRejected(415, "unsupported_encoding", f"unsupported Content-Encoding {encoding!r}")
        return decompress(body, encoding, limit)


def decompress(body: bytes, encoding: str, limit: int) -> bytes:
    """Decompress a gzip (every member, as RFC 1952 allows several) or zlib body, at most `limit` bytes.

    max_length makes a decompression bomb stop at the limit instead of filling memory.
    """
    wbits = 31 if encoding == "gzip" else zlib.MAX_WBITS
    parts: list[bytes] = []
    size = 0
    data = body
    while True:
        decompressor = zlib.decompressobj(wbits)
        try:
            part = decompressor.decompress(data, limit + 1 - size)
        except zlib.error as error:
            raise RequestRejected(400, "malformed", f"invalid {encoding} body: {error}") from None
        size += len(part)
        if size > limit:
            raise RequestRejected(413, "too_large", f"decompressed body exceeds max_request_bytes ({limit})")
        if not decompressor.eof:
            raise RequestRejected(400, "malformed", f"truncated {encoding} body")
        parts.append(part)
        data = decompressor.unused_data
        if not data:
            return b"".join(parts)
        if encoding != "gzip" or not data.startswith(b"\x1f\x8b"):
            raise RequestRejected(400, "malformed", f"unexpected data after the {encoding} stream")


async def read_all(request: web.Request, limit: int) -> bytes:
    """The whole body of `request`, joined once: aiohttp's read() grows a bytearray piece by piece,
    which copies a body of megabytes many times over. HTTPRequestEntityTooLarge beyond `limit` bytes."""
    length = request.content_length
    if length is not None and length > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=length)
    content = request.content
    content.set_read_chunk_size(limit)  # no pausing the connection: the body is read at once
    chunks: list[bytes] = []
    size = 0
    while chunk := await content.readany():
        size += len(chunk)
        if size > limit:
            raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=size)
        chunks.append(chunk)
    return b"".join(chunks)
