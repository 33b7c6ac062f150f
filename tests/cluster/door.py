"""A loopback port in front of a real server that a test can make fail on demand.

``StoreDoor`` forwards TCP to its target (say the Ceph RGW) until told to
``refuse`` (nothing listens: connecting fails at once with ECONNREFUSED) or to
go ``silent`` (connections are accepted and never answered, as a hung store
does).  ``forward`` opens it again on the same port.  Every switch drops the
connections made so far, so a client's pooled connections cannot hide it.
Runs on the test's reactor (no thread, no process).
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, endpoints, protocol, reactor
from twisted.protocols.portforward import ProxyFactory


class _Silent(protocol.Protocol):
    """Accepts and reads, never answers."""


class _Switch(protocol.Factory):
    def __init__(self, door: StoreDoor) -> None:
        self.door = door

    def buildProtocol(self, addr: Any) -> protocol.Protocol:
        if self.door.mode == "silent":
            proto: protocol.Protocol = _Silent()
        else:
            proto = self.door.forwarder.buildProtocol(addr)
        self.door.accepted.append(proto)
        return proto


class StoreDoor:
    def __init__(self, host: str, port: int) -> None:
        self.forwarder = ProxyFactory(host, port)
        self.mode = "forward"
        self.accepted: list[protocol.Protocol] = []
        self.port = 0
        self._listening: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def forward(self) -> None:
        """Forward new connections to the target (listening again if needed)."""
        await self._switch("forward")
        await self._listen()

    async def silent(self) -> None:
        """Accept new connections and never answer them."""
        await self._switch("silent")
        await self._listen()

    async def refuse(self) -> None:
        """Stop listening: connecting is refused."""
        await self._switch("refuse")
        if self._listening is not None:
            await self._listening.stopListening()
            self._listening = None

    async def close(self) -> None:
        await self.refuse()

    async def _listen(self) -> None:
        if self._listening is None:
            endpoint = endpoints.TCP4ServerEndpoint(reactor, self.port, interface="127.0.0.1")
            self._listening = await endpoint.listen(_Switch(self))
            self.port = self._listening.getHost().port

    @staticmethod
    def _when_lost(proto: protocol.Protocol) -> defer.Deferred:
        lost: defer.Deferred = defer.Deferred()
        original = proto.connectionLost

        def ended(reason: Any) -> None:
            original(reason)
            lost.callback(None)

        proto.connectionLost = ended  # type: ignore[method-assign]
        return lost

    async def _switch(self, mode: str) -> None:
        """Drop every connection made so far (both ends), and wait until they are gone."""
        self.mode = mode
        gone = []
        for proto in self.accepted:
            transport = proto.transport
            if transport is not None and transport.connected:
                gone.append(self._when_lost(proto))
                peer = getattr(proto, "peer", None)  # the forwarder's other end
                if peer is not None and peer.transport is not None and peer.transport.connected:
                    gone.append(self._when_lost(peer))
                    peer.transport.abortConnection()
                transport.abortConnection()
        self.accepted = []
        await defer.gatherResults(gone).addTimeout(10, reactor)
