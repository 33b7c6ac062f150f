"""What both WebSocket channels share: the handshake deadline, the count of
open channels for metrics, and the roll-call a graceful stop needs."""

from __future__ import annotations

from typing import Any

from autobahn.websocket.types import ConnectionDeny
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from wsfiles.config import CLOSE_HANDSHAKE_TIMEOUT, Settings
from wsfiles.metrics import Metrics


def protocol_options(settings: Settings, **limits: Any) -> dict[str, Any]:
    """Autobahn options both channels share; Autobahn's defaults are unsafe for a
    file server (no limits, no pings, an HTML status page, drop without a code)."""
    return {
        "closeHandshakeTimeout": CLOSE_HANDSHAKE_TIMEOUT,
        "failByDrop": False,  # peers over a limit get 1009, not a bare TCP drop
        "webStatus": False,
        "openHandshakeTimeout": settings.handshake_timeout,
        "autoPingInterval": settings.auto_ping_interval,
        "autoPingTimeout": settings.auto_ping_timeout,
        **limits,
    }


class ChannelBook:
    """The site-wide record of open channels."""

    def __init__(self, deadlines: Any, metrics: Metrics, clock: IReactorTime) -> None:
        self.deadlines = deadlines
        self.metrics = metrics
        self.clock = clock
        self.open: set[TrackedChannel] = set()

    def refuse(self, status: int, reason: str) -> ConnectionDeny:
        """Count a refused handshake; return the exception to raise."""
        self.metrics.refusals.labels(f"http_{status}").inc()
        return ConnectionDeny(status, reason)

    async def all_gone(self, seconds: float) -> None:
        """Wait until every open channel has closed; abort the stragglers after ``seconds``."""
        waiting = [channel.gone for channel in list(self.open)]
        if not waiting:
            return
        timer = self.clock.callLater(seconds, self._abort_all)
        try:
            await defer.gatherResults(waiting)
        finally:
            if timer.active():
                timer.cancel()

    def _abort_all(self) -> None:
        for channel in list(self.open):
            if channel.transport is not None:
                channel.transport.abortConnection()


class TrackedChannel:
    """Mixin for both channel protocols (before WebSocketServerProtocol in the MRO)."""

    factory: Any
    transport: Any
    channel_name = "?"

    def connectionMade(self) -> None:
        self.gone: Deferred = Deferred()
        super().connectionMade()  # type: ignore[misc]

    def onOpen(self) -> None:
        # Behind WebSocketResource the HTTPChannel stays registered as the
        # transport's producer: no other producer (a download's) could be
        # registered, and it would keep the channel and its Request (headers
        # and all, about 3 kB) alive as long as the connection.
        if getattr(self.transport, "producer", None) is not None:
            self.transport.unregisterProducer()
        book: ChannelBook = self.factory.book
        book.deadlines.met(self.transport)
        book.open.add(self)
        book.metrics.connections.labels(self.channel_name).inc()

    def connectionLost(self, reason: Any) -> None:
        book: ChannelBook = self.factory.book
        book.deadlines.met(self.transport)
        if self in book.open:
            book.open.discard(self)
            book.metrics.connections.labels(self.channel_name).dec()
        try:
            super().connectionLost(reason)  # type: ignore[misc]
        finally:
            if not self.gone.called:
                self.gone.callback(None)
