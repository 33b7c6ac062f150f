"""The HTTP side: one Site that serves ``/command``, ``/file`` and ``/``.

Both WebSocket endpoints share the listener through Autobahn's
WebSocketResource, so later pages and endpoints can join them on one port.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from typing import Any

from autobahn.twisted.resource import WebSocketResource
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, resource, server, static

from wsfiles.admission import HttpPool, forwarded_client, host_allowed, origin_allowed
from wsfiles.channels import ChannelBook
from wsfiles.command import CommandChannelFactory
from wsfiles.config import Settings
from wsfiles.downloads import DownloadResource, DownloadTickets, redact_ticket_uri
from wsfiles.httpfiles import FilesResource
from wsfiles.metrics import Metrics, MetricsPage
from wsfiles.pairing import PairingRegistry
from wsfiles.shares import ShareResource, ShareService, ShareSettings, redact_share_uri
from wsfiles.storage import IStorage
from wsfiles.timers import Deadline
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
    for script in (b"sha256.js", b"hash-worker.js"):  # the page's hashing (a Web Worker)
        path = os.path.join(STATIC, script.decode())
        root.putChild(script, PageFile(path, "text/javascript"))
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
        self.uri = redact_ticket_uri(redact_share_uri(path)) + (b"?<redacted>" if question else b"")

    def getHeader(self, name: bytes) -> bytes | None:
        """A Referer naming a share link is cut like the URI (share IDs are secrets)."""
        value = self._request.getHeader(name)
        if value is not None and name.lower() == b"referer":
            scheme, sep, rest = value.partition(b"://")
            host, slash, path = rest.partition(b"/")
            if sep and slash:
                return scheme + sep + host + redact_share_uri(b"/" + path.partition(b"?")[0])
        return value

    def __getattr__(self, name: str) -> object:
        return getattr(self._request, name)


def redacting_log_formatter(timestamp: str, request: server.Request) -> str:
    """Access-log lines without query strings (they may carry tokens or tickets)
    and with share IDs cut to a prefix (``/s/abcdef…``)."""
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


class HttpConnections:
    """The connections that are not (yet) WebSockets: their pool and deadlines.

    Each is counted in the pool (``HttpPool``: in total and per client
    address) from TCP accept until it closes or its WebSocket opens; its
    ``_DeadlineHTTPChannel`` keeps the deadlines.  ``met`` is the way out of
    both, whichever protocol owns the transport by then.
    """

    def __init__(self, clock: IReactorTime, settings: Settings, metrics: Metrics) -> None:
        self.clock = clock
        self.settings = settings
        self.seconds = settings.handshake_timeout
        self.metrics = metrics
        policy = settings.http
        self.pool = HttpPool(policy.max_connections, policy.max_per_ip, clock, self._evict)
        self._channels: dict[object, _DeadlineHTTPChannel] = {}

    def admit(self, channel: _DeadlineHTTPChannel) -> tuple[int, str] | None:
        """Count a new connection in the pool, or say why it is refused."""
        peer = getattr(channel.transport.getPeer(), "host", "")
        # Behind a trusted proxy the client is known once a request is read.
        address = None if peer in self.settings.trusted_proxies else peer
        refusal = self.pool.admit(channel.transport, address)
        if refusal is None:
            self._channels[channel.transport] = channel
        return refusal

    def met(self, transport: object) -> None:
        """``transport`` left the pool: its WebSocket opened, or it closed."""
        channel = self._channels.pop(transport, None)
        self.pool.release(transport)
        if channel is not None:
            channel.left_pool()

    def _evict(self, transport: Any, reason: str) -> None:
        channel = self._channels.pop(transport, None)
        _log.info(
            "dropped {peer}, idle or slow the longest, to make room: {reason}",
            peer=str(transport.getPeer()),
            reason=reason,
        )
        self.metrics.refusals.labels("http_evicted").inc()
        if channel is not None:
            channel.left_pool()
        transport.abortConnection()

    def __len__(self) -> int:
        return len(self._channels)


def _is_upgrade(request: server.Request) -> bool:
    upgrade = request.getHeader(b"upgrade") or b""
    return b"websocket" in upgrade.lower()


class _DeadlineHTTPChannel(http.HTTPChannel):
    """An HTTPChannel in the HTTP pool, under a deadline for every request.

    - Reading a request: its headers (and body) must arrive within
      ``--handshake-timeout``: from TCP accept for the first request, from its
      first byte for each later one on a kept-alive connection; bytes do not
      re-arm it, so trickling a header does not help.
    - Between requests a kept-alive connection may wait ``--keepalive-timeout``.
    - A WebSocket handshake stays under the same deadline until its 101 (the
      token check and the connection limits take part of it).
    - A plain response is not timed by the deadline: it is governed by the
      stall rule (``--stall-timeout`` without the client taking a byte), until
      its last byte has left (Twisted finishes a request once it is buffered),
      so long responses can be sent to a client that keeps reading.
    """

    site: WsfilesSite
    _connections: HttpConnections | None = None
    _deadline: Deadline | None = None
    _why = ""
    #: "request" (reading one), "upgrade" (a WebSocket handshake), "response".
    _phase = "request"
    _request_begun = False
    _refused = False
    #: The request is done but its answer is still being sent.
    _flushing = False
    #: Our transport, kept: a WebSocket handshake takes ``self.transport`` away
    #: while its deadline still runs.
    _own_transport: Any = None

    def connectionMade(self) -> None:
        super().connectionMade()
        self._own_transport = self.transport
        connections = self.site.connections
        refusal = connections.admit(self)
        if refusal is not None:
            self._refuse(*refusal)
            return
        self._connections = connections
        self._deadline = Deadline(connections.clock, connections.seconds, self._expired)
        self._await_request(first=True)

    def _refuse(self, status: int, reason: str) -> None:
        """Full pool: answer before the request comes, and hang up."""
        self._refused = True
        peer = str(self.transport.getPeer())
        _log.warn("refused an HTTP connection from {peer}: {reason}", peer=peer, reason=reason)
        self.site.metrics.refusals.labels(f"http_{status}").inc()
        body = (reason + "\n").encode()
        phrase = http.RESPONSES.get(status, b"Refused")
        self.transport.write(
            b"HTTP/1.1 %d %s\r\nConnection: close\r\nContent-Type: text/plain; charset=utf-8"
            b"\r\nContent-Length: %d\r\n\r\n%s" % (status, phrase, len(body), body)
        )
        self.loseConnection()

    def _arm(self, seconds: float, why: str) -> None:
        assert self._deadline is not None
        self._deadline.seconds = seconds
        self._why = why
        self._deadline.reset()

    def _await_request(self, first: bool) -> None:
        """Wait for the next request: under the handshake deadline (first) or
        the keep-alive one, which becomes the handshake deadline at its first byte."""
        assert self._connections is not None
        self._phase = "request"
        self._connections.pool.waiting(self.transport)
        if first:
            self._request_begun = True  # from accept: the wait is part of it
            self._arm(self._connections.seconds, "no request within the handshake deadline")
        else:
            self._request_begun = False
            self._arm(self._connections.settings.http.keepalive_timeout, "idle keep-alive")
            if self._dataBuffer or getattr(self, "_buffer", b""):
                self._begin_request()  # a pipelined request has begun already

    def _begin_request(self) -> None:
        self._request_begun = True
        assert self._connections is not None
        self._arm(self._connections.seconds, "no request within the handshake deadline")

    def dataReceived(self, data: bytes) -> None:
        if self._refused:
            return
        if self._phase == "request" and not self._request_begun and data:
            self._begin_request()
        super().dataReceived(data)

    def allContentReceived(self) -> None:
        self._flushing = False
        if self._connections is not None:
            self._connections.pool.busy(self.transport)
            if _is_upgrade(self.requests[-1]):
                self._phase = "upgrade"  # the deadline runs on, to the 101
            else:
                self._phase = "response"
                assert self._deadline is not None
                self._deadline.cancel()
        super().allContentReceived()

    def requestDone(self, request: Any) -> None:
        if self._connections is not None and self.transport is not None and self.persistent:
            if self._waitingForTransport:
                self._flushing = True  # still sending: the stall rule goes on
            else:
                self._await_request(first=False)
        super().requestDone(request)

    # The transport pauses us while what we send backs up: a response that
    # stays paused for --stall-timeout is given up (the stall rule).

    def pauseProducing(self) -> None:
        super().pauseProducing()
        if self._phase == "response" and self._connections is not None:
            self._arm(self._connections.settings.stall_timeout, "response stalled")

    def resumeProducing(self) -> None:
        # Cancel first: resuming refills the buffer and may pause again at once,
        # which re-arms the stall deadline (cancelling after would disarm it).
        if self._phase == "response" and self._deadline is not None:
            self._deadline.cancel()
        super().resumeProducing()
        if self._phase == "response" and self._deadline is not None:
            if self._deadline.armed:
                return  # paused again: still stalled for now
            if self._flushing and not self._handlingRequest:
                self._flushing = False  # the answer has left: wait for the next request
                self._await_request(first=False)

    def _expired(self) -> None:
        transport = self._own_transport
        if transport is None:
            return
        _log.info(
            "dropped {peer}: {why} ({seconds:g} s)",
            peer=str(transport.getPeer()),
            why=self._why,
            seconds=self._deadline.seconds if self._deadline is not None else 0,
        )
        transport.abortConnection()

    def left_pool(self) -> None:
        """The connection closed or became a WebSocket: no deadline of ours applies."""
        self._connections = None
        self._own_transport = None
        if self._deadline is not None:
            self._deadline.cancel()

    def connectionLost(self, reason: Any) -> None:
        if self._connections is not None and self.transport is not None:
            self._connections.met(self.transport)
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
        #: The last failure's reason, logged once until the check passes again
        #: (HAProxy asks every second per instance).
        self._failing: str | None = None

    def render_GET(self, request: server.Request) -> Any:
        def answer(status: int, body: dict[str, Any]) -> None:
            request.setResponseCode(status)
            request.setHeader(b"content-type", b"application/json")
            request.setHeader(b"cache-control", b"no-store")
            request.write(json.dumps(body).encode())
            request.finish()

        def healthy(details: dict[str, Any]) -> None:
            if self._failing is not None:
                _log.info("health check passes again")
                self._failing = None
            shared = self._shared() if self._shared is not None else {}
            status = "degraded" if "down" in shared.values() else "ok"
            answer(200, {"status": status, **details, **shared})

        def unhealthy(failure: Failure) -> None:
            reason = str(failure.value)
            kind = re.sub(r"\d+", "N", reason)  # "12345 bytes free" is one reason
            if kind != self._failing:
                _log.warn("health check failed: {reason}", reason=reason)
                self._failing = kind
            answer(503, {"status": "unavailable", "reason": str(failure.value)})

        self._storage.check(self._min_free).addCallbacks(healthy, unhealthy)
        return server.NOT_DONE_YET


class RefusalPage(resource.Resource):
    """A plain-text refusal with its status (421 for a foreign Host, 429 or 503
    for a full pool)."""

    isLeaf = True

    def __init__(self, status: int, phrase: bytes, text: str) -> None:
        super().__init__()
        self._status = status
        self._phrase = phrase
        self._text = text

    def render(self, request: server.Request) -> bytes:
        request.setResponseCode(self._status, self._phrase)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        return (self._text + "\n").encode()


#: Paths that answer whatever the Host: they read and change no file, and
#: load balancers and monitors probe them by address or without a Host.
HOST_EXEMPT = frozenset({b"healthz", b"metrics"})


class WsfilesSite(server.Site):
    """The Site, with the objects its protocols share reachable for tests and tools."""

    def __init__(
        self,
        settings: Settings,
        storage: IStorage,
        users: UserDirectory | None,
        clock: IReactorTime,
        *,
        shares: ShareSettings | None = None,
    ) -> None:
        self.settings = settings
        self.storage = storage
        self.clock = clock
        self.registry = PairingRegistry(clock, settings.channel_timeout, settings.instance_id)
        self.metrics = Metrics(lambda: self.registry.pending_tickets, storage.free_bytes)
        self.connections = HttpConnections(clock, settings, self.metrics)
        self.book = ChannelBook(self.connections, self.metrics, clock)
        self.command_factory = CommandChannelFactory(
            settings, storage, self.registry, users, clock=clock, book=self.book
        )
        redis = self.command_factory.redis
        self.shared_health = redis.health if redis is not None else None
        self.file_factory = FileChannelFactory(settings, self.registry, book=self.book)
        self.shares = ShareService(
            shares or ShareSettings(), storage, users, clock, self.metrics, settings
        )
        if redis is not None:
            self.shares.use_redis(redis.link)
        self.command_factory.shares = self.shares  # each command session gets it
        root = resource.Resource()
        add_web_client(root)
        origins = settings.allow_origins
        root.putChild(b"command", GuardedWebSocketResource(self.command_factory, origins))
        root.putChild(b"file", GuardedWebSocketResource(self.file_factory, origins))
        root.putChild(b"healthz", HealthPage(storage, settings.min_free, self.shared_health))
        root.putChild(b"whoami", WhoAmIPage(self.command_factory))
        root.putChild(b"files", FilesResource(self.command_factory))
        root.putChild(b"s", ShareResource(self.shares))
        self.downloads = DownloadTickets(self.command_factory)
        self.shares.downloads = self.downloads  # sessions reach it with their shares
        root.putChild(b"d", DownloadResource(self.downloads))
        if settings.metrics_on_main_listener:
            root.putChild(b"metrics", MetricsPage(self.metrics))
        super().__init__(root, logFormatter=redacting_log_formatter, reactor=clock)
        self._users_generation = users.generation if users is not None else 0
        self.protocol = _DeadlineHTTPChannel

    def getResourceFor(self, request: server.Request) -> Any:
        """Every request's way in: who it is from, and whether its Host is ours."""
        refusal = self._readdress(request)
        if refusal is not None:
            return refusal
        if request.postpath[:1] and request.postpath[0] in HOST_EXEMPT:
            return super().getResourceFor(request)
        hosts = request.requestHeaders.getRawHeaders(b"host") or []
        host = hosts[0].decode("latin-1") if len(hosts) == 1 else None
        if len(hosts) > 1 or not host_allowed(host, self.settings.http.allow_hosts):
            _log.info(
                "refused a request for host {host!r} from {peer}: not a name this service"
                " answers to (add it with --allow-host)",
                host=host if len(hosts) <= 1 else hosts,
                peer=str(request.getClientAddress()),
            )
            self.metrics.refusals.labels("http_421").inc()
            return RefusalPage(
                421, b"Misdirected Request", "this service does not answer to that host name"
            )
        return super().getResourceFor(request)

    def _readdress(self, request: server.Request) -> RefusalPage | None:
        """Behind a trusted proxy, count the connection under the client its
        request names (X-Forwarded-For); refuse it if that client is over its limit."""
        transport = request.channel.transport if request.channel is not None else None
        if transport is None:
            return None
        peer = getattr(transport.getPeer(), "host", "")
        trusted = self.settings.trusted_proxies
        if peer not in trusted:
            return None
        forwarded = (request.getHeader(b"x-forwarded-for") or b"").decode("latin-1")
        client = forwarded_client(peer, forwarded, trusted)
        refusal = self.connections.pool.readdress(transport, client)
        if refusal is None:
            return None
        status, reason = refusal
        _log.warn("refused a request for {client}: {reason}", client=client, reason=reason)
        self.metrics.refusals.labels(f"http_{status}").inc()
        return RefusalPage(status, http.RESPONSES.get(status, b"Refused"), reason)

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
