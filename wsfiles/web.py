"""The HTTP side: one Site that serves ``/command``, ``/file`` and ``/``.

Both WebSocket endpoints share the listener through Autobahn's
WebSocketResource, so later pages and endpoints can join them on one port.
"""

from __future__ import annotations

from autobahn.twisted.resource import WebSocketResource
from twisted.internet.interfaces import IReactorTime
from twisted.web import http, resource, server

from wsfiles.command import CommandChannelFactory
from wsfiles.config import Settings
from wsfiles.pairing import PairingRegistry
from wsfiles.storage import IStorage
from wsfiles.transfer import FileChannelFactory
from wsfiles.users import UserDirectory


class IndexPage(resource.Resource):
    """``GET /``: says what this is, for a person who opens it in a browser."""

    isLeaf = True

    def render_GET(self, request: server.Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return (
            b"wsfiles: a WebSocket file service.\n"
            b"Connect a WebSocket to /command; see docs/protocol.md.\n"
        )


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
        self.registry = PairingRegistry(clock, settings.channel_timeout)
        self.command_factory = CommandChannelFactory(settings, storage, self.registry, users)
        self.file_factory = FileChannelFactory(settings, self.registry)
        root = resource.Resource()
        root.putChild(b"", IndexPage())
        root.putChild(b"command", WebSocketResource(self.command_factory))
        root.putChild(b"file", WebSocketResource(self.file_factory))
        super().__init__(root, logFormatter=redacting_log_formatter, reactor=clock)
