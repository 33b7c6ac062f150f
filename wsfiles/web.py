"""The HTTP side: one Site that serves ``/command``, ``/file`` and ``/``.

Both WebSocket endpoints share the listener through Autobahn's
WebSocketResource, so later pages and endpoints can join them on one port.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

from autobahn.twisted.resource import WebSocketResource
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, resource, server, static

from wsfiles.admission import origin_allowed
from wsfiles.channels import ChannelBook
from wsfiles.command import CommandChannelFactory
from wsfiles.config import Settings
from wsfiles.metrics import Metrics, MetricsPage
from wsfiles.pairing import PairingRegistry
from wsfiles.storage import IStorage
from wsfiles.transfer import FileChannelFactory
from wsfiles.users import UserDirectory
from wsfiles.whoami import WhoAmIPage

_log = Logger()


STATIC = os.path.join(os.path.dirname(__file__), "static")


class PageFile(static.File):
    """A file of the web client, sent with headers that keep it to itself."""

    def render_GET(self, request: server.Request) -> Any:
        request.setHeader(
            b"content-security-policy",
            b"default-src 'self'; connect-src 'self' ws: wss:; frame-ancestors 'none'",
        )
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"referrer-policy", b"no-referrer")
        return super().render_GET(request)


def add_web_client(root: resource.Resource) -> None:
    """``/`` serves the single-page client; its assets sit beside it."""
    root.putChild(b"", PageFile(os.path.join(STATIC, "index.html"), "text/html; charset=utf-8"))
    root.putChild(b"app.js", PageFile(os.path.join(STATIC, "app.js"), "text/javascript"))
    root.putChild(b"app.css", PageFile(os.path.join(STATIC, "app.css"), "text/css"))
    root.putChild(b"favicon.svg", PageFile(os.path.join(STATIC, "favicon.svg"), "image/svg+xml"))


class GuardedWebSocketResource(WebSocketResource):
    """WebSocketResource that refuses cross-site handshakes with 403.

    Checked here, before Autobahn parses the handshake, so every refused
    origin gets the same answer (Autobahn's own checks answer 400).
    """

    def __init__(self, factory: Any, allowed_origins: tuple[str, ...]) -> None:
        super().__init__(factory)
        self._allowed_origins = allowed_origins

    def render(self, request: server.Request) -> Any:
        origins = request.requestHeaders.getRawHeaders(b"origin") or []
        host = request.getHeader(b"host")
        allowed = len(origins) <= 1 and origin_allowed(
            origins[0].decode("latin-1") if origins else None,
            host.decode("latin-1") if host else None,
            self._allowed_origins,
            request.isSecure(),
        )
        if not allowed:
            _log.info(
                "refused a handshake from {peer}: origin {origins!r} not allowed",
                peer=str(request.getClientAddress()),
                origins=origins,
            )
            request.setResponseCode(403)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"origin not allowed\n"
        return super().render(request)


class _RedactedRequest:
    """A view of a request whose URI has its query string hidden."""

    def __init__(self, request: server.Request) -> None:
        self._request = request
        path, question, _ = request.uri.partition(b"?")
        self.uri = path + (b"?<redacted>" if question else b"")

    def __getattr__(self, name: str) -> object:
        return getattr(self._request, name)


def redacting_log_formatter(timestamp: str, request: server.Request) -> str:
    """Access-log lines without query strings: they may carry tokens or tickets."""
    return http.combinedLogFormatter(timestamp, _RedactedRequest(request))


def is_health_check(request: server.Request) -> bool:
    """``GET /healthz`` is kept out of the access log: a balancer asks every
    second (HAProxy's ``inter 1s``), and a failing check logs its own warning."""
    return request.path == b"/healthz"


class _OperationsSite(server.Site):
    """``--metrics-listen``'s Site: health checks stay out of its access log too."""

    def log(self, request: server.Request) -> None:
        if not is_health_check(request):
            super().log(request)


class HandshakeDeadlines:
    """Aborts connections that have not completed a handshake in time.

    The deadline runs from TCP accept until the WebSocket handshake's 101 is
    sent (or a plain HTTP request has been answered), and incoming bytes do
    not re-arm it: a slowloris client that trickles a header byte by byte is
    dropped all the same.
    """

    def __init__(self, clock: IReactorTime, seconds: float) -> None:
        self._clock = clock
        self.seconds = seconds
        self._calls: dict[object, IDelayedCall] = {}

    def start(self, transport: object) -> None:
        self._calls[transport] = self._clock.callLater(self.seconds, self._expire, transport)

    def met(self, transport: object) -> None:
        call = self._calls.pop(transport, None)
        if call is not None and call.active():
            call.cancel()

    def _expire(self, transport: Any) -> None:
        del self._calls[transport]
        _log.info(
            "dropped {peer}: no handshake within {seconds:g} s",
            peer=str(transport.getPeer()),
            seconds=self.seconds,
        )
        transport.abortConnection()

    def __len__(self) -> int:
        return len(self._calls)


class _DeadlineHTTPChannel(http.HTTPChannel):
    """An HTTPChannel whose connection must finish its first exchange in time."""

    site: WsfilesSite

    def connectionMade(self) -> None:
        super().connectionMade()
        self.site.deadlines.start(self.transport)

    def requestDone(self, request: Any) -> None:
        if self.transport is not None:
            self.site.deadlines.met(self.transport)
        super().requestDone(request)

    def connectionLost(self, reason: Any) -> None:
        if self.transport is not None:
            self.site.deadlines.met(self.transport)
        super().connectionLost(reason)


class HealthPage(resource.Resource):
    """``GET /healthz``: 200 when the root can be listed and written, else 503 and why."""

    isLeaf = True

    def __init__(
        self,
        storage: IStorage,
        min_free: int,
        shared: Callable[[], dict[str, str]] | None = None,
    ) -> None:
        super().__init__()
        self._storage = storage
        self._min_free = min_free
        self._shared = shared

    def render_GET(self, request: server.Request) -> Any:
        def answer(status: int, body: dict[str, Any]) -> None:
            request.setResponseCode(status)
            request.setHeader(b"content-type", b"application/json")
            request.setHeader(b"cache-control", b"no-store")
            request.write(json.dumps(body).encode())
            request.finish()

        def healthy(details: dict[str, Any]) -> None:
            shared = self._shared() if self._shared is not None else {}
            status = "degraded" if "down" in shared.values() else "ok"
            answer(200, {"status": status, **details, **shared})

        def unhealthy(failure: Failure) -> None:
            _log.warn("health check failed: {reason}", reason=str(failure.value))
            answer(503, {"status": "unavailable", "reason": str(failure.value)})

        self._storage.check(self._min_free).addCallbacks(healthy, unhealthy)
        return server.NOT_DONE_YET


class WsfilesSite(server.Site):
    """The Site, with the objects its protocols share reachable for tests and tools."""

    def __init__(
        self,
        settings: Settings,
        storage: IStorage,
        users: UserDirectory | None,
        clock: IReactorTime,
    ) -> None:
        self.settings = settings
        self.storage = storage
        self.clock = clock
        self.registry = PairingRegistry(clock, settings.channel_timeout, settings.instance_id)
        self.deadlines = HandshakeDeadlines(clock, settings.handshake_timeout)
        self.metrics = Metrics(lambda: self.registry.pending_tickets, storage.free_bytes)
        self.book = ChannelBook(self.deadlines, self.metrics, clock)
        self.command_factory = CommandChannelFactory(
            settings, storage, self.registry, users, clock=clock, book=self.book
        )
        redis = self.command_factory.redis
        self.shared_health = redis.health if redis is not None else None
        self.file_factory = FileChannelFactory(settings, self.registry, book=self.book)
        root = resource.Resource()
        add_web_client(root)
        origins = settings.allow_origins
        root.putChild(b"command", GuardedWebSocketResource(self.command_factory, origins))
        root.putChild(b"file", GuardedWebSocketResource(self.file_factory, origins))
        root.putChild(b"healthz", HealthPage(storage, settings.min_free, self.shared_health))
        root.putChild(b"whoami", WhoAmIPage(self.command_factory))
        if settings.metrics_on_main_listener:
            root.putChild(b"metrics", MetricsPage(self.metrics))
        super().__init__(root, logFormatter=redacting_log_formatter, reactor=clock)
        self._users_generation = users.generation if users is not None else 0
        self.protocol = _DeadlineHTTPChannel

    def operations_site(self) -> server.Site:
        """A separate Site for ``--metrics-listen``: /metrics and /healthz only."""
        root = resource.Resource()
        root.putChild(b"metrics", MetricsPage(self.metrics))
        root.putChild(
            b"healthz", HealthPage(self.storage, self.settings.min_free, self.shared_health)
        )
        return _OperationsSite(root)

    def recheck_users(self) -> None:
        """Close the command channels of users removed or re-tokened since the last look.

        Called every USERS_RECHECK_EVERY seconds: a changed users file is
        noticed within that, whether or not a handshake re-read it first.
        """
        users = self.command_factory.users
        if users is None:
            return
        generation = users.reload()
        if generation == self._users_generation:
            return
        self._users_generation = generation
        for channel in list(self.book.open):
            if channel.channel_name == "command":
                channel.end_if_revoked(users)

    def log(self, request: server.Request) -> None:
        if not is_health_check(request):
            super().log(request)

    async def drain(self, grace: float) -> None:
        """A graceful stop: transfers in flight get ``grace`` seconds to finish.

        New transfers are refused (``unavailable``) meanwhile; then every
        channel is closed (1001), which aborts what is left (temp files
        removed, resumable uploads kept for resuming).
        """
        self.command_factory.draining = True
        sessions = [
            channel.session
            for channel in list(self.book.open)
            if getattr(channel, "session", None) is not None
        ]
        if sessions:
            _log.info("stopping: waiting up to {grace:g} s for transfers in flight", grace=grace)
            settled: Deferred = Deferred()
            quiet = defer.gatherResults([session.begin_drain() for session in sessions])
            quiet.addBoth(lambda _: settled.called or settled.callback(True))
            timer = self.clock.callLater(grace, lambda: settled.called or settled.callback(False))
            if not await settled:
                _log.warn("stopping: grace period over, aborting what is left")
            if timer.active():
                timer.cancel()
        for channel in list(self.book.open):
            if channel.channel_name == "command":
                channel.going_away()
        await self.book.all_gone(5.0)
