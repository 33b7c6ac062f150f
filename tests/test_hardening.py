"""Hostile and broken clients over real loopback sockets: origin, deadlines, limits."""

from __future__ import annotations

import os
from typing import Any

import pytest
import pytest_twisted
from conftest import handshake_status
from e2e_helpers import command_channels, within
from twisted.internet import endpoints, protocol, reactor, task
from twisted.internet.defer import Deferred

from wsfiles.admission import Limits
from wsfiles.client import WsfilesError


class _RawPeer(protocol.Protocol):
    """A TCP client that sends what it is told and notices when it is dropped."""

    def __init__(self) -> None:
        self.lost: Deferred = Deferred()
        self.received = b""

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: object) -> None:
        self.lost.callback(None)


async def raw_connect(server) -> _RawPeer:
    port = int(server.url.rsplit(":", 1)[1])
    endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    return await endpoints.connectProtocol(endpoint, _RawPeer())


# -- Origin --------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_foreign_and_null_origins_get_403(server):
    for origin in ("http://evil.example", "null", "http://127.0.0.1:1", "file://"):
        status = await handshake_status(server.url, "/command", {"Origin": [origin]})
        assert status == 403, origin


@pytest_twisted.ensureDeferred
async def test_same_origin_and_originless_clients_are_allowed(server):
    port = server.url.rsplit(":", 1)[1]
    page = await server.connect(headers={"Origin": f"http://127.0.0.1:{port}"})
    assert page.hello["op"] == "hello"
    plain = await server.connect()  # no Origin: not a browser
    assert plain.hello["op"] == "hello"


@pytest_twisted.ensureDeferred
async def test_listed_origins_and_star(server_factory):
    srv = await server_factory(allow_origins=("https://app.example",))
    client = await srv.connect(headers={"Origin": "https://app.example"})
    assert client.hello["op"] == "hello"
    assert (
        await handshake_status(srv.url, "/command", {"Origin": ["https://app.example:444"]}) == 403
    )
    anything = await server_factory(allow_origins=("*",))
    client = await anything.connect(headers={"Origin": "https://anywhere.example"})
    assert client.hello["op"] == "hello"


@pytest_twisted.ensureDeferred
async def test_file_channel_checks_origin_too(server):
    client = await server.connect()
    request_id = client.send({"op": "save", "name": "a", "size": 1})
    offer = await client.reply(request_id)
    assert offer["op"] == "channel"
    status = await handshake_status(server.url, offer["url"], {"Origin": ["http://evil.example"]})
    assert status == 403
    # The refused attempt did not use the ticket up.
    await client._open_file_channel(offer["url"])
    assert (await client.reply(request_id))["op"] == "ready"
    client.send_on_file_channel(b"x")
    assert (await client.reply(request_id))["op"] == "ack"


# -- deadlines -----------------------------------------------------------------


@pytest.mark.parametrize(
    "first_bytes",
    [b"", b"GET /command HTTP/1.1\r\nHost: 127.0.0.1\r\n"],
    ids=["silent", "half-handshake"],
)
@pytest_twisted.ensureDeferred
async def test_slowloris_is_dropped_at_the_handshake_deadline(server_factory, first_bytes):
    srv = await server_factory(handshake_timeout=0.5, limits=Limits(total=1))
    peer = await raw_connect(srv)
    peer.transport.write(first_bytes)
    # It holds no slot while it dawdles: a real client gets in meanwhile...
    client = await srv.connect()
    await srv.close_client(client)
    # ...and it is dropped, whatever it sent.
    await peer.lost.addTimeout(10, reactor)
    assert peer.received == b""


@pytest_twisted.ensureDeferred
async def test_trickling_bytes_do_not_extend_the_handshake_deadline(server_factory):
    srv = await server_factory(handshake_timeout=0.5)
    peer = await raw_connect(srv)
    request = b"GET /command HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: " + b"a" * 1000
    sent = iter(request)

    def trickle() -> None:
        byte = next(sent, None)
        if byte is not None and peer.transport.connected:
            peer.transport.write(bytes([byte]))

    loop = task.LoopingCall(trickle)
    loop.clock = reactor
    loop.start(0.05)
    try:
        await peer.lost.addTimeout(10, reactor)
    finally:
        loop.stop()


@pytest_twisted.ensureDeferred
async def test_idle_command_channel_is_closed(server_factory):
    srv = await server_factory(idle_timeout=0.5)
    client = await srv.connect()
    code = await client._command_factory.closed.addTimeout(10, reactor)
    assert code == 1000


@pytest_twisted.ensureDeferred
async def test_stalled_upload_fails_with_stalled_and_leaves_nothing(server_factory):
    srv = await server_factory(stall_timeout=0.5)
    (srv.root / "keep").write_bytes(b"old")
    client = await srv.connect()
    request_id = client.send({"op": "save", "name": "keep", "size": 100})
    offer = await client.reply(request_id)
    await client._open_file_channel(offer["url"])
    assert (await client.reply(request_id))["op"] == "ready"
    client._file.beginMessage(isBinary=True)
    client._file.sendMessageFrame(b"x" * 10)  # ...and then nothing more
    error = await client.reply(request_id)
    assert error["code"] == "stalled"
    assert (srv.root / "keep").read_bytes() == b"old"
    assert os.listdir(srv.root / ".wsfiles-tmp") == []
    assert [f["name"] for f in await client.list()] == ["keep"]


# -- limits --------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_total_limit_answers_503_and_a_closed_connection_frees_its_slot(server_factory):
    srv = await server_factory(limits=Limits(total=2))
    first, second = await srv.connect(), await srv.connect()
    for _ in range(3):  # refused attempts hold no slot
        assert await handshake_status(srv.url, "/command") == 503
    with pytest.raises(WsfilesError):
        await srv.connect()
    await srv.close_client(first)
    third = await srv.connect()
    assert third.hello["op"] == "hello"
    assert second.hello["op"] == "hello"


@pytest_twisted.ensureDeferred
async def test_per_ip_limit_answers_429(server_factory):
    srv = await server_factory(limits=Limits(per_ip=1))
    await srv.connect()
    assert await handshake_status(srv.url, "/command") == 429


@pytest_twisted.ensureDeferred
async def test_per_client_limit_answers_429(server_factory, tmp_path):
    from wsfiles.users import UserDirectory, add_user

    path = str(tmp_path / "users")
    alice, bob = add_user(path, "alice"), add_user(path, "bob")
    srv = await server_factory(users=UserDirectory(path), limits=Limits(per_client=1))
    await srv.connect(alice)
    status = await handshake_status(srv.url, "/command", {"Authorization": [f"Bearer {alice}"]})
    assert status == 429
    other = await srv.connect(bob)  # another client is not affected
    assert other.hello["client"] == "bob"


@pytest_twisted.ensureDeferred
async def test_rate_limited_commands_are_answered_and_the_connection_stays(server_factory):
    srv = await server_factory(rate_limit=5)
    client = await srv.connect()
    ids = [client.send({"op": "list"}) for _ in range(8)]
    replies = [await client.reply(i) for i in ids]
    codes = [r.get("code") for r in replies]
    assert codes.count("rate_limited") >= 1
    assert codes[:5] == [None] * 5
    await task.deferLater(reactor, 1.0, lambda: None)  # let the bucket refill: time is the subject
    assert isinstance(await client.list(), list)


@pytest_twisted.ensureDeferred
async def test_a_client_that_stops_reading_replies_stops_being_read(server):
    """Replies pace commands: once a client's unread replies fill the command
    channel's send buffer, the server stops reading its commands and holds
    those already read, rather than buffer a listing (here about 300 kB) for
    each without bound; every reply comes, in order, once it reads again."""
    for i in range(3000):
        (server.folder() / f"a-file-with-a-name-long-enough-to-weigh-{i:05d}.bin").touch()
    client = await server.connect()
    (command,) = command_channels(server)
    assert command.transport.producer is command
    paused: Deferred = Deferred()
    pause = command.pauseProducing

    def noting_pause() -> None:
        pause()
        if not paused.called:
            paused.callback(None)

    command.pauseProducing = noting_pause
    assert client._command is not None
    client._command.transport.pauseProducing()  # the client stops reading
    ids = [client.send({"op": "list"}) for _ in range(45)]  # within the rate limit
    await within(paused)
    # Paused from inside the write that filled the buffer: let the rest of that
    # read (the other commands) be parsed, then look.
    await task.deferLater(reactor, 0, lambda: None)
    connection = command.transport.transport  # the TCP connection under the test's wrapper
    assert connection not in reactor.getReaders()
    assert command.session._backed_up
    buffered = len(connection.dataBuffer) + connection._tempDataLen
    assert buffered < 1_000_000  # about one listing, not 45 (14 MB)

    client._command.transport.resumeProducing()
    for request_id in ids:
        reply = await within(client.reply(request_id))
        assert reply["op"] == "list" and len(reply["files"]) == 3000
    assert connection in reactor.getReaders()  # reading again
    assert not command.session._backed_up


@pytest_twisted.ensureDeferred
async def test_quota_refuses_before_any_channel_is_offered(server_factory):
    srv = await server_factory(quota=1000)
    client = await srv.connect()
    await client.upload("a", b"x" * 600)
    with pytest.raises(WsfilesError) as refused:
        await client.upload("b", b"y" * 401)
    assert refused.value.code == "quota_exceeded"
    await client.upload("b", b"y" * 400)  # reaching the quota exactly is fine
    await client.upload("a", b"z" * 600)  # replacing counts the difference only
    assert sorted(f["name"] for f in await client.list()) == ["a", "b"]


@pytest_twisted.ensureDeferred
async def test_a_dead_peer_is_found_by_auto_ping_and_frees_its_slot(server_factory):
    srv = await server_factory(
        auto_ping_interval=0.3, auto_ping_timeout=0.3, limits=Limits(total=1)
    )
    peer = await raw_connect(srv)
    host_port = srv.url.split("://", 1)[1]
    peer.transport.write(
        f"GET /command HTTP/1.1\r\nHost: {host_port}\r\nConnection: Upgrade\r\n"
        "Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n".encode()
    )
    # The peer completes the handshake, then never answers a ping.
    await peer.lost.addTimeout(10, reactor)
    assert peer.received.startswith(b"HTTP/1.1 101")
    client = await srv.connect()  # its slot is free again
    assert client.hello["op"] == "hello"


@pytest_twisted.ensureDeferred
async def test_x_forwarded_for_counts_only_from_a_trusted_proxy(server_factory):
    trusting = await server_factory(limits=Limits(per_ip=1), trusted_proxies=("127.0.0.1",))
    first = {"X-Forwarded-For": ["203.0.113.7"]}
    await trusting.connect(headers={"X-Forwarded-For": "203.0.113.7"})
    assert await handshake_status(trusting.url, "/command", first) == 429  # same client IP
    other = await trusting.connect(headers={"X-Forwarded-For": "203.0.113.8"})
    assert other.hello["op"] == "hello"  # another client behind the same proxy

    wary = await server_factory(limits=Limits(per_ip=1))  # no trusted proxy: the peer counts
    await wary.connect(headers={"X-Forwarded-For": "203.0.113.7"})
    status = await handshake_status(wary.url, "/command", {"X-Forwarded-For": ["203.0.113.9"]})
    assert status == 429


@pytest_twisted.ensureDeferred
async def test_reconnecting_with_a_token_skips_scrypt_and_wrong_tokens_still_get_401(
    server_factory, tmp_path
):
    from wsfiles.users import UserDirectory, add_user

    path = tmp_path / "users"
    alice = add_user(str(path), "alice")
    users = UserDirectory(str(path))
    srv = await server_factory(users=users)
    for _ in range(3):
        client = await srv.connect(alice)
        assert client.hello["client"] == "alice"
        await srv.close_client(client)
    assert users.scrypt_checks == 1
    token_id, secret = alice.split(".")
    for wrong in (f"{token_id}.{'0' * len(secret)}", alice + "0"):
        status = await handshake_status(srv.url, "/command", {"Authorization": [f"Bearer {wrong}"]})
        assert status == 401
    # Removed from the users file: refused at once, although it was remembered.
    path.write_text("")
    status = await handshake_status(srv.url, "/command", {"Authorization": [f"Bearer {alice}"]})
    assert status == 401


@pytest_twisted.ensureDeferred
async def test_an_open_command_channel_keeps_no_http_request_alive(server_factory):
    """Memory per idle connection: the HTTP request that carried the handshake is freed."""
    import gc

    from twisted.web import http

    srv = await server_factory()
    for _ in range(3):
        client = await srv.connect()
        assert isinstance(await client.list(), list)
    gc.collect()
    channels = [obj for obj in gc.get_objects() if isinstance(obj, http.HTTPChannel)]
    assert channels == []


@pytest_twisted.ensureDeferred
async def test_an_open_command_channel_keeps_a_small_instance_dict(server_factory):
    """Memory per idle connection: Autobahn's options live on the protocol class,
    its handshake data and default-valued state are dropped, no send queue or
    transfer queue exists; the connection still lists, hears live updates, and
    closes cleanly."""
    srv = await server_factory()
    watcher = await srv.connect()
    client = await srv.connect()

    for channel in command_channels(srv):
        state = vars(channel)
        assert len(state) <= 21, sorted(state)  # a dict of at most 21 keys takes 464 bytes
        for name in ("http_headers", "http_request_data", "http_response_data", "_wskey"):
            assert name not in state
        assert "autoPingInterval" not in state and channel.autoPingInterval == 30.0
        assert channel.send_queue == () and channel.session._transfers is None
        assert channel.session._stall_deadline is None
        assert len(vars(channel.transport)) <= 21  # rebuilt: 464 bytes, not 832
    await client.upload("a.txt", b"abc")
    assert [f["name"] for f in await client.list()] == ["a.txt"]
    files = await watcher.changes.get().addTimeout(10, reactor)
    assert [f["name"] for f in files] == ["a.txt"]
    for channel in command_channels(srv):
        assert channel.session._transfers is None  # released once the transfer is done
    await srv.close_client(client)
    await srv.close_client(watcher)


def test_text_frame_matches_autobahn_for_every_length_encoding():
    """The command channel's own text frames are byte for byte what Autobahn sends."""
    from autobahn.twisted.websocket import WebSocketServerProtocol

    from wsfiles.command import text_frame

    class Capture(WebSocketServerProtocol):
        maskServerFrames = False
        logFrames = False

        def __init__(self) -> None:
            from autobahn.websocket.protocol import TrafficStats

            self.sent: list[bytes] = []
            self.trafficStats = TrafficStats()

        def sendData(self, data: bytes, sync: bool = False, chopsize: Any = None) -> None:
            self.sent.append(data)

    proto = Capture()
    proto.factory = type("F", (), {"isServer": True})()
    for size in (0, 1, 125, 126, 65535, 65536, 70000):
        payload = bytes([0x61]) * size
        proto.sendFrame(opcode=1, payload=payload)
        assert text_frame(payload) == proto.sent[-1], size


@pytest_twisted.ensureDeferred
async def test_a_client_gone_during_its_token_check_gets_no_session_and_queued_checks_are_skipped(
    server_factory, tmp_path, monkeypatch
):
    """Handshakes abandoned while scrypt runs open nothing, hold no slot, and the
    checks still queued behind them are skipped instead of hashed for nobody."""
    import threading

    from twisted.internet import defer

    import wsfiles.users
    from wsfiles import session as session_module
    from wsfiles.users import SCRYPT_AT_ONCE, UserDirectory, add_user

    path = tmp_path / "users"
    tokens = [add_user(str(path), f"user{i}") for i in range(SCRYPT_AT_ONCE + 2)]
    users = UserDirectory(str(path))
    checks: list[defer.Deferred] = []
    all_asked: defer.Deferred = defer.Deferred()
    authenticate = users.authenticate

    def recording(token: str, wanted: Any = None, address: str | None = None) -> defer.Deferred:
        d = authenticate(token, wanted, address)
        checks.append(d)
        if len(checks) == len(tokens):
            all_asked.callback(None)
        return d

    # The running checks finish only once the clients have left (deterministic).
    left = threading.Event()
    real_verify = wsfiles.users._verify

    def held_verify(secret: str, hashed: str) -> bool:
        left.wait(30)
        return real_verify(secret, hashed)

    monkeypatch.setattr(wsfiles.users, "_verify", held_verify)

    monkeypatch.setattr(users, "authenticate", recording)
    started: list[str] = []
    real_start = session_module.CommandSession.start

    def counting_start(self: Any) -> None:
        started.append(self.client)
        real_start(self)

    monkeypatch.setattr(session_module.CommandSession, "start", counting_start)
    srv = await server_factory(users=users)
    port = int(srv.url.rsplit(":", 1)[1])

    class HitAndRun(protocol.Protocol):
        def __init__(self, token: str) -> None:
            self.token = token

        def connectionMade(self) -> None:
            self.transport.write(
                b"GET /command HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                b"Sec-WebSocket-Version: 13\r\n"
                b"Authorization: Bearer " + self.token.encode() + b"\r\n\r\n"
            )

    endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    runners = [await endpoints.connectProtocol(endpoint, HitAndRun(token)) for token in tokens]
    await within(all_asked)  # the server has read every handshake: leave
    for runner in runners:
        runner.transport.loseConnection()
    await within(defer.gatherResults([w.lost for w in list(srv.tracker.protocols)]))
    left.set()
    await within(defer.gatherResults(checks))
    await within(defer.gatherResults([w.lost for w in list(srv.tracker.protocols)]))

    assert started == []  # no session was ever opened for a gone connection
    assert srv.site.command_factory.slots.total == 0
    assert users.scrypt_skipped >= 1  # the checks queued behind the running ones
    assert users.scrypt_checks + users.scrypt_skipped == len(tokens)
    # The server still serves a client that stays.
    monkeypatch.setattr(wsfiles.users, "_verify", real_verify)
    client = await srv.connect(tokens[0])
    assert client.hello["client"] == "user0"
    assert started == ["user0"]
