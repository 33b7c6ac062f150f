"""Connections that are not (yet) WebSockets (issue 15, items 1 and 3):
every request of a kept-alive connection is under the handshake deadline, the
wait between requests is bounded, they are counted in a pool of their own, and
every request must name a host the service answers to (DNS rebinding)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from conftest import TEARDOWN_TIMEOUT, TwistdServer, _TwistdProtocol, handshake_status, twistd_args
from e2e_helpers import MiB, within
from twisted.internet import defer, endpoints, protocol, reactor, task
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.python import usage
from twisted.web import resource, server, static
from zope.interface import implementer

from wsfiles.admission import HttpPolicy, HttpPool
from wsfiles.client import connect
from wsfiles.tap import Options


class HttpPeer(protocol.Protocol):
    """A raw HTTP client: sends what it is told, parses the responses it gets
    (Content-Length bodies), and notices when it is dropped."""

    def __init__(self) -> None:
        self.buffer = b""
        self._chunks: list[bytes] = []
        self._received = 0
        self._need = 0
        self.responses: list[tuple[int, bytes]] = []
        self._waiting: list[tuple[int, Deferred]] = []
        self.lost: Deferred = Deferred()
        self.lost_at: float | None = None

    def dataReceived(self, data: bytes) -> None:
        self._chunks.append(data)
        self._received += len(data)
        if self._received < self._need:
            return  # the body announced is not all here yet: do not parse again
        self.buffer += b"".join(self._chunks)
        self._chunks = []
        self._received = len(self.buffer)
        self._need = 0
        while (parsed := self._one_response()) is not None:
            self.responses.append(parsed)
        for count, waiter in list(self._waiting):
            if len(self.responses) >= count:
                self._waiting.remove((count, waiter))
                waiter.callback(self.responses[count - 1])

    def _one_response(self) -> tuple[int, bytes] | None:
        """The first whole response in the buffer (taken out of it), or None."""
        head, found, rest = self.buffer.partition(b"\r\n\r\n")
        if not found:
            return None
        fields = {}
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            fields[name.strip().lower()] = value.strip()
        if fields.get(b"transfer-encoding", b"").lower() == b"chunked":
            body = b""
            while True:
                size_line, found, after = rest.partition(b"\r\n")
                if not found:
                    return None
                size = int(size_line.split(b";")[0], 16)
                if len(after) < size + 2:
                    return None
                body += after[:size]
                rest = after[size + 2 :]
                if size == 0:
                    break
        else:
            length = int(fields.get(b"content-length", b"0"))
            if len(rest) < length:
                self._need = len(head) + 4 + length
                return None
            body, rest = rest[:length], rest[length:]
        self.buffer = rest
        return int(head.split(b" ", 2)[1]), body

    def response(self, number: int) -> Deferred:
        """Fires with the ``number``-th response (from 1): (status, body)."""
        if len(self.responses) >= number:
            return defer.succeed(self.responses[number - 1])
        waiter: Deferred = Deferred()
        self._waiting.append((number, waiter))
        return waiter

    def connectionLost(self, reason: object) -> None:
        self.lost_at = reactor.seconds()
        for _, waiter in self._waiting:
            waiter.errback(AssertionError(f"closed before a response: {self.buffer!r}"))
        self._waiting = []
        self.lost.callback(None)


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


async def open_peer(url: str, source: str = "127.0.0.1") -> HttpPeer:
    endpoint = endpoints.TCP4ClientEndpoint(
        reactor, "127.0.0.1", port_of(url), bindAddress=(source, 0)
    )
    return await endpoints.connectProtocol(endpoint, HttpPeer())


def get(path: str, host: str, **headers: str) -> bytes:
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}"]
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def server_side(srv: Any, peer: HttpPeer) -> Any:
    """The server's end of ``peer``'s connection (it sees the close even when
    ``peer`` has stopped reading and would not)."""
    port = peer.transport.getHost().port
    (wrapper,) = [w for w in srv.tracker.protocols if w.transport.getPeer().port == port]
    return wrapper


async def close_all(peers: list[HttpPeer]) -> None:
    for peer in peers:
        if peer.transport is not None and peer.transport.connected:
            peer.transport.abortConnection()
    await within(defer.gatherResults([peer.lost for peer in peers]), TEARDOWN_TIMEOUT)


# -- deadlines on kept-alive connections (item 1) -------------------------------


@pytest_twisted.ensureDeferred
async def test_kept_alive_connections_stalling_in_a_second_request_are_closed_at_the_deadline(
    server_factory,
):
    """Each request's headers are under the handshake deadline, not only the
    first's: 40 connections send a request, read the answer, then start a
    second request and stall in its headers (half of them trickling a byte
    every 0.1 s); each is closed at the deadline (1 s), long before the
    keep-alive timeout or Twisted's own 60 s idle timer."""
    srv = await server_factory(handshake_timeout=1.0, http=HttpPolicy(keepalive_timeout=30))
    host = srv.url.split("://", 1)[1]
    peers = [await open_peer(srv.url) for _ in range(40)]
    for peer in peers:
        peer.transport.write(get("/healthz", host))
    for peer in peers:
        assert (await within(peer.response(1)))[0] == 200
    second = get("/healthz", host, X_Padding="a" * 200)
    stalled_at = reactor.seconds()
    for peer in peers:
        peer.transport.write(second[:30])
    trickle = iter(second[30:])

    def more() -> None:
        byte = next(trickle, None)
        for peer in peers[::2]:
            if byte is not None and peer.transport.connected:
                peer.transport.write(bytes([byte]))

    loop = task.LoopingCall(more)
    loop.clock = reactor
    loop.start(0.1)
    try:
        await within(defer.gatherResults([peer.lost for peer in peers]), 15)
    finally:
        loop.stop()
    assert all(len(peer.responses) == 1 for peer in peers)  # no second answer
    slowest = max(peer.lost_at for peer in peers) - stalled_at  # type: ignore[type-var]
    assert slowest < 10  # 1 s, plus however long a contended machine takes


@pytest_twisted.ensureDeferred
async def test_the_wait_for_the_next_request_is_bounded_by_the_keepalive_timeout(server_factory):
    srv = await server_factory(handshake_timeout=30, http=HttpPolicy(keepalive_timeout=0.5))
    peer = await open_peer(srv.url)
    peer.transport.write(get("/healthz", srv.url.split("://", 1)[1]))
    assert (await within(peer.response(1)))[0] == 200
    await within(peer.lost)  # idle after its answer: closed at 0.5 s, not at 30 s or 60 s


@pytest_twisted.ensureDeferred
async def test_a_response_is_timed_by_the_stall_rule_not_the_handshake_deadline(server_factory):
    """A response the client reads slowly outlives the handshake deadline; one
    it stops reading is cut once it has stalled for --stall-timeout."""
    srv = await server_factory(handshake_timeout=0.5, stall_timeout=2.0)
    body = os.urandom(16 * MiB)  # far above every buffer between us
    srv.site.resource.putChild(b"big", static.Data(body, "application/octet-stream"))
    host = srv.url.split("://", 1)[1]
    slow, gone = await open_peer(srv.url), await open_peer(srv.url)
    for peer in (slow, gone):
        peer.transport.pauseProducing()  # not reading yet
        peer.transport.write(get("/big", host))
    await task.deferLater(reactor, 1.0, lambda: None)  # time is the subject: > the deadline
    slow.transport.resumeProducing()
    status, received = await within(slow.response(1), 30)
    assert status == 200 and received == body
    await within(server_side(srv, gone).lost, 30)  # never read: cut by the stall rule
    assert gone.responses == []
    await close_all([slow, gone])


@implementer(IPushProducer)
class _Endless:
    """A push producer that writes a chunk whenever it is resumed, as a file
    download does: resuming it refills the buffer and pauses it again at once."""

    def __init__(self, request: Any) -> None:
        self.request = request
        self.paused = False

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        while not self.paused and not self.request.finished and not self.request._disconnected:
            self.request.write(b"x" * 65536)

    def stopProducing(self) -> None:
        self.paused = True


class _EndlessPage(resource.Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> Any:
        producer = _Endless(request)
        request.registerProducer(producer, True)
        producer.resumeProducing()
        return server.NOT_DONE_YET


@pytest_twisted.ensureDeferred
async def test_a_streamed_response_that_stops_being_read_after_a_while_is_cut(server_factory):
    """A producer-fed response is paused and resumed as the client reads; once
    the client stops for good the stall rule still applies (the deadline armed
    by the pause inside a resume used to be cancelled right after)."""
    srv = await server_factory(stall_timeout=1.0)
    srv.site.resource.putChild(b"endless", _EndlessPage())
    peer = await open_peer(srv.url)
    host = srv.url.split("://", 1)[1]
    read_some: defer.Deferred = defer.Deferred()
    original = peer.dataReceived

    def then_stop(data: bytes) -> None:
        original(data)
        if peer._received > 4 * MiB and not read_some.called:
            peer.transport.pauseProducing()  # the client stops reading for good
            read_some.callback(None)

    peer.dataReceived = then_stop  # type: ignore[method-assign]
    peer.transport.write(get("/endless", host))
    await within(read_some, 30)
    await within(server_side(srv, peer).lost, 15)  # cut by the stall rule
    await close_all([peer])


# -- the pool of HTTP connections (item 1) ---------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_full_pool_refuses_newcomers_then_makes_room_by_dropping_the_longest_idle(
    server_factory,
):
    srv = await server_factory(http=HttpPolicy(max_connections=3), handshake_timeout=30)
    pool = srv.site.connections.pool
    pool.evict_after = 3600.0  # nobody has waited long enough to be dropped
    held = [await open_peer(srv.url) for _ in range(3)]
    refused = await open_peer(srv.url)
    await within(refused.lost)
    ((status, body),) = refused.responses  # answered before it asked, then closed
    assert status == 503 and b"HTTP connections" in body
    assert pool.total == 3

    pool.evict_after = 0.0  # now the longest waiting makes room
    newcomer = await open_peer(srv.url)
    await within(held[0].lost)
    newcomer.transport.write(get("/", srv.url.split("://", 1)[1]))
    assert (await within(newcomer.response(1)))[0] == 200
    assert all(peer.transport.connected for peer in held[1:])
    assert pool.total == 3
    await close_all([*held[1:], newcomer])


@pytest_twisted.ensureDeferred
async def test_the_pool_per_address_leaves_other_addresses_alone(server_factory):
    srv = await server_factory(http=HttpPolicy(max_per_ip=2), handshake_timeout=30)
    srv.site.connections.pool.evict_after = 3600.0
    mine = [await open_peer(srv.url) for _ in range(2)]
    third = await open_peer(srv.url)
    await within(third.lost)
    ((status, body),) = third.responses
    assert status == 429 and b"this address" in body
    other = await open_peer(srv.url, source="127.0.0.2")  # another address
    other.transport.write(get("/healthz", srv.url.split("://", 1)[1]))
    assert (await within(other.response(1)))[0] == 200
    assert all(peer.transport.connected for peer in mine)
    await close_all([*mine, other])


@pytest_twisted.ensureDeferred
async def test_behind_a_trusted_proxy_the_pool_counts_the_forwarded_address(server_factory):
    """A proxy's connections are counted per client once a request names it."""
    srv = await server_factory(
        trusted_proxies=("127.0.0.1",), http=HttpPolicy(max_per_ip=1), handshake_timeout=30
    )
    srv.site.connections.pool.evict_after = 3600.0
    host = srv.url.split("://", 1)[1]
    first, second, third = [await open_peer(srv.url) for _ in range(3)]  # all from the proxy
    first.transport.write(get("/healthz", host, X_Forwarded_For="203.0.113.7"))
    assert (await within(first.response(1)))[0] == 200
    second.transport.write(get("/healthz", host, X_Forwarded_For="203.0.113.7"))
    status, body = await within(second.response(1))
    assert status == 429 and b"this address" in body
    third.transport.write(get("/healthz", host, X_Forwarded_For="203.0.113.8"))
    assert (await within(third.response(1)))[0] == 200
    await close_all([first, second, third])


async def start_twistd_with_few_descriptors(root: Path, nofile: int, *args: str) -> TwistdServer:
    """The real twistd (as conftest's start_twistd) with a low open-file limit."""
    proto = _TwistdProtocol()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    argv = [
        "/usr/bin/prlimit",
        f"--nofile={nofile}:{nofile}",
        *twistd_args("--listen", "tcp:0:interface=127.0.0.1", "--root", str(root), *args),
    ]
    process = reactor.spawnProcess(proto, argv[0], argv, env=env, path=str(root.parent))
    try:
        host_port = await within(proto.listening, 30)
    except Exception:
        if not proto.ended.called:
            process.signalProcess("KILL")
            await proto.ended
        raise
    return TwistdServer(process, proto, f"ws://{host_port}", root)


@pytest.mark.skipif(not os.path.exists("/usr/bin/prlimit"), reason="needs util-linux prlimit")
@pytest_twisted.ensureDeferred
async def test_a_flood_of_idle_http_connections_does_not_keep_a_command_channel_out(tmp_path):
    """The real twistd with 128 descriptors (its pool: a quarter, 32) and 200
    idle connections: beyond the pool they are turned away, not accepted until
    the descriptors run out, and a client still logs in and lists."""
    srv = await start_twistd_with_few_descriptors(
        tmp_path / "root", 128, "--handshake-timeout", "60"
    )
    flood: list[HttpPeer] = []
    try:
        flood = [await open_peer(srv.url) for _ in range(200)]
        # Time is the subject: the pool drops a connection only once it has
        # waited a moment (a burst of real clients is not cut).
        await task.deferLater(reactor, HttpPool.evict_after + 0.5, lambda: None)
        client = await within(connect(srv.url), 15)
        try:
            assert client.hello["op"] == "hello"
            assert await within(client.list()) == []
        finally:
            await within(client.close())
        held = [peer for peer in flood if peer.lost_at is None]
        assert len(held) <= 32
    finally:
        await close_all(flood)
        await srv.stop()


# -- Host names (item 3: DNS rebinding) ---------------------------------------------


async def status_of(url: str, request: bytes) -> tuple[int, bytes]:
    peer = await open_peer(url)
    peer.transport.write(request)
    try:
        return await within(peer.response(1))
    finally:
        await close_all([peer])


@pytest.mark.parametrize("path", ["/", "/app.js", "/whoami", "/nothing-here"])
@pytest_twisted.ensureDeferred
async def test_pages_for_a_foreign_host_get_421(server, path):
    port = port_of(server.url)
    status, body = await status_of(server.url, get(path, f"evil.example:{port}"))
    assert status == 421
    assert b"host name" in body


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "[::1]", "LocalHost.", "10.1.2.3"])
@pytest_twisted.ensureDeferred
async def test_localhost_and_ip_literals_are_always_served(server, host):
    port = port_of(server.url)
    status, body = await status_of(server.url, get("/", f"{host}:{port}"))
    assert status == 200 and b"<html" in body.lower()


@pytest_twisted.ensureDeferred
async def test_a_request_without_host_is_served(server):
    status, _ = await status_of(server.url, b"GET / HTTP/1.0\r\n\r\n")
    assert status == 200


@pytest_twisted.ensureDeferred
async def test_a_rebound_page_cannot_open_a_command_channel(server):
    """The attack: a page on evil.example:PORT, its name re-pointed to the
    server, sends matching Host and Origin; the Origin check alone let it in."""
    port = port_of(server.url)
    rebound = {"Host": [f"evil.example:{port}"], "Origin": [f"http://evil.example:{port}"]}
    assert await handshake_status(server.url, "/command", rebound) == 421
    twice = {"Host": [f"127.0.0.1:{port}", f"evil.example:{port}"]}
    assert await handshake_status(server.url, "/command", twice) == 421
    assert server.site.book.open == set()


@pytest_twisted.ensureDeferred
async def test_a_file_channel_for_a_foreign_host_gets_421_and_keeps_its_ticket(server):
    client = await server.connect()
    request_id = client.send({"op": "save", "name": "a", "size": 1})
    offer = await within(client.reply(request_id))
    port = port_of(server.url)
    status = await handshake_status(server.url, offer["url"], {"Host": [f"evil.example:{port}"]})
    assert status == 421
    await within(client._open_file_channel(offer["url"]))  # the ticket was not used up
    assert (await within(client.reply(request_id)))["op"] == "ready"
    client.send_on_file_channel(b"x")
    assert (await within(client.reply(request_id)))["op"] == "ack"


@pytest.mark.parametrize("path", ["/healthz", "/metrics"])
@pytest_twisted.ensureDeferred
async def test_health_and_metrics_answer_whatever_the_host(server, path):
    status, _ = await status_of(server.url, get(path, "monitor.internal"))
    assert status == 200


@pytest_twisted.ensureDeferred
async def test_allowed_host_names_are_served_and_others_still_refused(server_factory):
    srv = await server_factory(
        http=HttpPolicy(allow_hosts=("files.example.org", "*.apps.example.org"))
    )
    port = port_of(srv.url)
    for host in ("files.example.org:443", "FILES.example.org.", "a.apps.example.org"):
        assert (await status_of(srv.url, get("/", host)))[0] == 200, host
    for host in ("example.org", "apps.example.org", "files.example.org.evil.example"):
        assert (await status_of(srv.url, get("/", host)))[0] == 421, host
    # A browser on the allowed name: Host and Origin agree.
    page = {"Host": [f"files.example.org:{port}"], "Origin": [f"http://files.example.org:{port}"]}
    assert await handshake_status(srv.url, "/command", page) == 101


def test_allow_host_takes_names_only(tmp_path):
    root = ["--root", str(tmp_path / "r")]
    options = Options()
    options.parseOptions([*root, "--allow-host", "Files.Example.org.", "--allow-host", "*"])
    assert options.settings().http.allow_hosts == ("files.example.org", "*")
    for bad in ("files.example.org:443", "https://files.example.org", "a/b", ""):
        with pytest.raises(usage.UsageError, match="--allow-host"):
            Options().parseOptions([*root, "--allow-host", bad])
