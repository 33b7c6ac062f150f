"""Ping floods on the file channel (issue 15, item 4): pongs a client never
reads pace the reading of its pings, as replies pace commands on /command."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from e2e_helpers import MiB, open_channel, within
from twisted.internet import defer, endpoints, protocol, reactor, task
from twisted.internet.defer import Deferred

from wsfiles.client import connect

#: One masked ping with the largest control payload (RFC 6455: 125 bytes).
PING = bytes((0x89, 0x80 | 125)) + b"\0\0\0\0" + b"p" * 125  # the zero mask leaves it as is


def pings(total: int) -> list[bytes]:
    """``total`` bytes of pings, in 1 MiB writes."""
    chunk = PING * (MiB // len(PING))
    return [chunk] * (total // len(chunk))


async def until(condition: Any, seconds: float = 20.0) -> None:
    """Poll ``condition`` until it holds (bounded): the network settles at its own pace."""
    for _ in range(int(seconds / 0.05)):
        if condition():
            return
        await task.deferLater(reactor, 0.05, lambda: None)
    raise AssertionError(f"not within {seconds} s: {condition.__doc__}")


def file_channels(server: Any) -> list[Any]:
    return [c for c in server.site.book.open if c.channel_name == "file"]


@pytest_twisted.ensureDeferred
async def test_a_client_that_pings_without_reading_pongs_stops_being_read(server):
    """Once the pongs a client leaves unread fill the file channel's send
    buffer, the server stops reading that client (its pings wait in the
    network), rather than buffer a pong per ping without bound; it reads again
    once the client does, and the upload then completes."""
    client = await server.connect()
    request_id = client.send({"op": "save", "name": "a", "size": 5})
    offer = await within(client.reply(request_id))
    await open_channel(client, offer["url"])
    assert (await within(client.reply(request_id)))["op"] == "ready"
    (channel,) = file_channels(server)

    assert client._file is not None
    wire = client._file.transport
    wire.pauseProducing()  # the client stops reading
    for chunk in pings(16 * MiB):  # a pong each: 16 MiB, far above any buffer
        wire.write(chunk)
    connection = channel.transport.transport  # the TCP connection under the test's wrapper
    unsent = [-1]

    def settled() -> bool:
        """the server stops reading and the client's pings stop leaving"""
        before, unsent[0] = unsent[0], len(wire.dataBuffer) + wire._tempDataLen
        return connection not in reactor.getReaders() and unsent[0] == before

    await until(settled)
    buffered = len(connection.dataBuffer) + connection._tempDataLen
    assert buffered < 1 * MiB  # about the 256 KiB send buffer, not 16 MiB of pongs
    assert unsent[0] > 8 * MiB  # most pings were never read

    wire.resumeProducing()
    await until(lambda: connection in reactor.getReaders())
    client.send_on_file_channel(b"hello")
    ack = await within(client.reply(request_id), 60)  # after every ping queued before it
    assert ack["op"] == "ack"
    assert (server.folder() / "a").read_bytes() == b"hello"


@pytest_twisted.ensureDeferred
async def test_pings_during_a_download_are_read_and_answered_once_it_drains(server):
    """During a download the server keeps reading (pongs to its own pings and a
    close must get through), so pings sent by a client that reads nothing
    are read too: they get one pong, for the latest, once the send buffer
    drains, rather than a pong each buffered behind the file."""
    data = os.urandom(32 * MiB)
    (server.folder() / "big.bin").write_bytes(data)
    client = await server.connect()
    sink = io.BytesIO()
    download = defer.ensureDeferred(client.download("big.bin", sink))
    await until(lambda: sink.tell() > 0)
    assert client._file is not None
    wire = client._file.transport
    wire.pauseProducing()  # the client stops reading, mid-download
    for chunk in pings(16 * MiB):
        wire.write(chunk)
    (channel,) = file_channels(server)
    connection = channel.transport.transport

    def all_read() -> bool:
        """the server reads every ping while the download waits for the client"""
        return len(wire.dataBuffer) + wire._tempDataLen == 0

    await until(all_read)
    buffered = len(connection.dataBuffer) + connection._tempDataLen
    assert buffered < 4 * MiB  # a frame of the file and the send buffer, not 16 MiB of pongs

    wire.resumeProducing()
    sent = await within(download, 60)
    assert sink.getvalue() == data
    assert sent["sha256"] == hashlib.sha256(data).hexdigest()


class _Flooder(protocol.Protocol):
    """Opens a file channel by hand, then sends pings as fast as the server
    takes them and never reads a byte after the handshake's answer."""

    def __init__(self, request: bytes) -> None:
        self._request = request
        self._head = b""
        self.opened: Deferred = Deferred()
        self.lost: Deferred = Deferred()
        self._chunk = PING * (MiB // len(PING))
        self.sent = 0

    def connectionMade(self) -> None:
        self.transport.write(self._request)

    def dataReceived(self, data: bytes) -> None:
        if self.opened.called:
            return
        self._head += data
        if b"\r\n\r\n" in self._head:
            self.transport.pauseProducing()  # read nothing more: no pong
            self.opened.callback(self._head.split(b" ", 2)[1])

    # IPullProducer: the transport asks for more each time its buffer drained.
    def start_flood(self) -> None:
        self.transport.registerProducer(self, False)

    def resumeProducing(self) -> None:
        self.sent += len(self._chunk)
        self.transport.write(self._chunk)

    def stopProducing(self) -> None:
        pass

    def stop_flood(self) -> None:
        self.transport.unregisterProducer()
        self.transport.abortConnection()

    def connectionLost(self, reason: object) -> None:
        self.lost.callback(None)


def rss(pid: int) -> int:
    """The process's resident set size in bytes (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


FLOOD_SECONDS = float(os.environ.get("WSFILES_FLOOD_SECONDS", "15"))


@pytest.mark.timeout(120)
@pytest_twisted.ensureDeferred
async def test_twistd_memory_stays_flat_under_a_file_channel_ping_flood(twistd_factory):
    """The real service, one client flooding pings on /file without reading:
    its RSS grows by less than 50 MiB (1 MiB here; without back-pressure it
    grew by 122 MiB in these 15 s, 65 MiB in 8 s)."""
    srv = await twistd_factory("--ping-interval", "3600", "--stall-timeout", "3600")
    client = await within(connect(srv.url))
    try:
        request_id = client.send({"op": "save", "name": "a", "size": 5})
        offer = await within(client.reply(request_id))
        host_port = srv.url.split("://", 1)[1]
        host, port = host_port.rsplit(":", 1)
        request = (
            f"GET {offer['url']} HTTP/1.1\r\nHost: {host_port}\r\nConnection: Upgrade\r\n"
            "Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        ).encode()
        endpoint = endpoints.TCP4ClientEndpoint(reactor, host, int(port))
        flooder = await endpoints.connectProtocol(endpoint, _Flooder(request))
        assert await within(flooder.opened) == b"101"
        before = rss(srv.process.pid)
        flooder.start_flood()
        await task.deferLater(reactor, FLOOD_SECONDS, lambda: None)  # time is the subject
        grown = rss(srv.process.pid) - before
        flooder.stop_flood()
        await within(flooder.lost)
        assert flooder.sent > 2 * MiB  # it did flood
        assert grown < 50 * MiB, f"RSS grew by {grown / MiB:.0f} MiB"
    finally:
        await within(client.close())
