"""Protocol 1.1 end to end: resume, ranges, checksums, delete/rename, live updates."""

from __future__ import annotations

import hashlib
import io
import os
from typing import Any

import pytest
import pytest_twisted
from e2e_helpers import local_only
from twisted.internet import defer, endpoints, protocol, reactor
from twisted.internet.defer import Deferred

from wsfiles.client import WsfilesError, _Download
from wsfiles.session import FEATURES

# These suites run against every storage backend (local folders, and S3 on a
# real Ceph RGW): they reach the stored files only through the storage
# interface (server.put, server.read, server.stored, server.leftovers).
pytestmark = pytest.mark.every_backend


def _copy(d: Any) -> Any:
    """A Deferred that fires when ``d`` does, without taking its result."""
    copy: Deferred = Deferred()
    d.addBoth(lambda result: (copy.callback(None), result)[1])
    return copy


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def refused(awaitable: Any) -> str:
    with pytest.raises(WsfilesError) as info:
        await awaitable
    return info.value.code


@pytest_twisted.ensureDeferred
async def test_hello_names_the_features(server):
    client = await server.connect()
    assert client.hello["protocol"] == 1
    assert (
        set(client.hello["features"])
        == set(FEATURES)
        == {"resume", "range", "checksum", "delete", "rename", "changed", "chunked", "pieces"}
        | {"share", "download"}
    )


# -- ranged downloads ------------------------------------------------------------


async def raw_get(client, message: dict[str, Any], on_sending: Any = None) -> tuple[list, bytes]:
    """A get driven by hand: its replies, and the bytes of its binary message."""
    sink = io.BytesIO()
    client._download = download = _Download(sink)
    request_id = client.send(message)
    replies: list[dict[str, Any]] = []
    while not replies or replies[-1]["op"] not in ("sent", "error"):
        reply = await client.reply(request_id)
        replies.append(reply)
        if reply["op"] == "channel":
            await client._open_file_channel(reply["url"])
        elif reply["op"] == "sending" and on_sending is not None:
            await on_sending()
    if replies[-1]["op"] == "sent":
        await download.done.addTimeout(10, reactor)
    return replies, sink.getvalue()


@pytest_twisted.ensureDeferred
async def test_ranged_get_sends_the_rest_and_the_whole_files_hash(server):
    data = os.urandom(300_000)
    await server.put("f", data)
    client = await server.connect()
    for offset in (0, 1, 131_072, 299_999, 300_000):
        replies, received = await raw_get(client, {"op": "get", "name": "f", "offset": offset})
        sending = next(r for r in replies if r["op"] == "sending")
        assert sending["offset"] == offset and sending["size"] == len(data)
        assert received == data[offset:]
        assert replies[-1]["sha256"] == sha(data)


@pytest_twisted.ensureDeferred
async def test_a_file_in_pieces_gives_each_piece_and_its_own_hash(server):
    data = os.urandom(300_000)
    await server.put("f", data)
    client = await server.connect()
    pieces = []
    for offset, length in ((0, 131_072), (131_072, 131_072), (262_144, 131_072), (299_000, 0)):
        message = {"op": "get", "name": "f", "offset": offset, "length": length}
        replies, received = await raw_get(client, message)
        expected = data[offset : offset + length]
        sending = next(r for r in replies if r["op"] == "sending")
        assert (sending["offset"], sending["length"], sending["size"]) == (
            offset,
            len(expected),  # the last piece stops at the end of the file
            len(data),
        )
        assert received == expected
        assert replies[-1]["op"] == "sent" and "sha256" not in replies[-1]
        assert replies[-1]["range_sha256"] == sha(expected)
        assert replies[-1]["length"] == len(expected)
        pieces.append(received)
    assert b"".join(pieces) == data
    # length alone: from the start
    replies, received = await raw_get(client, {"op": "get", "name": "f", "length": 10})
    assert received == data[:10] and replies[-1]["range_sha256"] == sha(data[:10])


@pytest.mark.parametrize("length", [-1, 1.5, True, "3", None])
@pytest_twisted.ensureDeferred
async def test_bad_lengths_are_bad_requests(server, length):
    await server.put("f", b"x" * 1000)
    client = await server.connect()
    reply = await client.reply(client.send({"op": "get", "name": "f", "length": length}))
    assert reply["op"] == "error" and reply["code"] == "bad_request"
    assert not client.has_file_channel


@pytest.mark.parametrize("offset", [300_001, -1, 1.5, True, "3", None])
@pytest_twisted.ensureDeferred
async def test_bad_offsets_are_bad_requests(server, offset):
    await server.put("f", b"x" * 300_000)
    client = await server.connect()
    reply = await client.reply(client.send({"op": "get", "name": "f", "offset": offset}))
    assert reply["op"] == "error" and reply["code"] == "bad_request"
    assert not client.has_file_channel


# -- checksums -------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_declared_checksum_is_verified_before_the_file_is_replaced(server):
    await server.put("f", b"old version")
    client = await server.connect()
    ack = await client.upload("f", b"new version", checksum=True)
    assert ack["sha256"] == sha(b"new version")
    request_id = client.send({"op": "save", "name": "f", "size": 5, "sha256": sha(b"other")})
    assert (await client.reply(request_id))["op"] == "ready"
    client.send_on_file_channel(b"wrong")
    error = await client.reply(request_id)
    assert error["code"] == "checksum_mismatch"
    assert (await server.read("f")) == b"new version"
    assert await server.leftovers() == []


@pytest.mark.parametrize("value", ["abc", "g" * 64, 5, True, "A" * 63])
@pytest_twisted.ensureDeferred
async def test_malformed_checksums_are_bad_requests(server, value):
    client = await server.connect()
    reply = await client.reply(client.send({"op": "save", "name": "f", "size": 1, "sha256": value}))
    assert reply["code"] == "bad_request"


# -- delete and rename -----------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_delete_and_its_refusals(server):
    await server.put("f", b"x")
    client = await server.connect()
    assert await client.delete("f") == {"op": "deleted", "name": "f", "id": 1}
    assert not await server.exists("f")
    assert await refused(client.delete("f")) == "not_found"
    assert await refused(client.delete("../etc")) == "invalid_name"
    if server.backend == "local":  # a folder is not a file
        (server.root / "dir").mkdir()
        assert await refused(client.delete("dir")) == "not_found"


@pytest_twisted.ensureDeferred
async def test_rename_refuses_to_overwrite_unless_asked(server):
    await server.put("a", b"A")
    await server.put("b", b"B")
    client = await server.connect()
    assert await refused(client.rename("a", "b")) == "exists"
    assert (await server.read("a")) == b"A" and (await server.read("b")) == b"B"
    reply = await client.rename("a", "c")
    assert (reply["op"], reply["name"], reply["to"]) == ("renamed", "a", "c")
    assert (await server.read("c")) == b"A" and not await server.exists("a")
    await client.rename("c", "b", overwrite=True)
    assert (await server.read("b")) == b"A"
    assert [f["name"] for f in await client.list()] == ["b"]
    assert await refused(client.rename("missing", "x")) == "not_found"
    # A 1.1 channel has no paths: the server refuses one (the library would
    # refuse it first, pointing to protocol 1.2, so the command goes raw).
    reply = await client.reply(client.send({"op": "rename", "name": "b", "to": "a/b"}))
    assert reply["code"] == "invalid_name"
    reply = await client.reply(client.send({"op": "rename", "name": "b"}))
    assert reply["code"] == "bad_request"


@pytest_twisted.ensureDeferred
async def test_deleting_a_file_being_downloaded_does_not_break_the_download(server):
    data = os.urandom(4 * 1024 * 1024)
    await server.put("big", data)
    reader = await server.connect()
    writer = await server.connect()

    async def delete_it() -> None:
        await writer.delete("big")

    replies, received = await raw_get(reader, {"op": "get", "name": "big"}, delete_it)
    assert received == data and replies[-1]["sha256"] == sha(data)
    assert not await server.exists("big")


# -- live updates ----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_changed_reaches_every_connection_of_that_client_only(server_factory, tmp_path):
    from wsfiles.users import UserDirectory, add_user

    path = str(tmp_path / "users")
    alice, bob = add_user(path, "alice"), add_user(path, "bob")
    srv = await server_factory(users=UserDirectory(path))
    first, second = await srv.connect(alice), await srv.connect(alice)
    other = await srv.connect(bob)
    await first.upload("notes", b"hello")
    for connection in (first, second):
        files = await connection.changes.get().addTimeout(10, reactor)
        assert [f["name"] for f in files] == ["notes"]
    await second.rename("notes", "renamed")
    for connection in (first, second):
        files = await connection.changes.get().addTimeout(10, reactor)
        assert [f["name"] for f in files] == ["renamed"]
    await first.delete("renamed")
    for connection in (first, second):
        assert await connection.changes.get().addTimeout(10, reactor) == []
    await other.list()  # anything sent to bob would have arrived by now
    assert other.changes.pending == []


@pytest_twisted.ensureDeferred
async def test_changes_are_coalesced(server):
    for i in range(30):
        await server.put(f"f{i:02}", b"x")
    client = await server.connect()
    ids = [client.send({"op": "delete", "name": f"f{i:02}"}) for i in range(30)]
    for request_id in ids:
        assert (await client.reply(request_id))["op"] == "deleted"
    events = [await client.changes.get().addTimeout(10, reactor)]
    while events[-1]:
        events.append(await client.changes.get().addTimeout(10, reactor))
    assert len(events) < 5  # not one per delete


# -- resumable uploads -------------------------------------------------------------


async def start_resumable(client, name: str, data: bytes, sent: int, **extra: Any) -> int:
    """Begin a resumable save of ``data`` and send its first ``sent`` bytes; return its id."""
    request_id = client.send(
        {"op": "save", "name": name, "size": len(data), "resume": True, **extra}
    )
    reply = await client.reply(request_id)
    if reply["op"] == "channel":
        await client._open_file_channel(reply["url"])
        reply = await client.reply(request_id)
    assert reply["op"] == "ready" and reply["offset"] == 0
    client._file.beginMessage(isBinary=True)
    client._file.sendMessageFrame(data[:sent])
    return request_id


async def resume_offset(client, name: str, size: int, **extra: Any) -> tuple[int, int]:
    request_id = client.send({"op": "save", "name": name, "size": size, "resume": True, **extra})
    while True:
        reply = await client.reply(request_id)
        if reply["op"] == "channel":
            await client._open_file_channel(reply["url"])
        else:
            assert reply["op"] == "ready", reply
            return request_id, reply["offset"]


async def cut_file_channel(server, client) -> None:
    """Close the file channel mid-message, and wait until the server noticed.

    A close frame, not a TCP abort: it follows the data on the same stream,
    so the server has every byte sent before it, and the test knows how many.
    """
    port = client._file.transport.getHost().port
    (wrapper,) = [w for w in server.tracker.protocols if w.transport.getPeer().port == port]
    client._file.sendClose(1000)
    await wrapper.lost.addTimeout(10, reactor)


@pytest_twisted.ensureDeferred
async def test_an_interrupted_resumable_upload_resumes_where_it_stopped(server):
    local_only(server, "byte-exact partials; the S3 backend keeps whole parts (test_s3_storage.py)")
    data = os.urandom(1_000_000)
    await server.put("f", b"previous")
    client = await server.connect()
    first = await start_resumable(client, "f", data, 400_000)
    await cut_file_channel(server, client)
    assert (await client.reply(first))["code"] == "channel_closed"
    assert [f["name"] for f in await client.list()] == ["f"]  # the partial is hidden
    assert (await server.read("f")) == b"previous"
    request_id, offset = await resume_offset(client, "f", len(data))
    assert offset == 400_000
    client.send_on_file_channel(data[offset:])
    ack = await client.reply(request_id)
    assert ack["op"] == "ack" and ack["sha256"] == sha(data)
    assert (await server.read("f")) == data


@pytest_twisted.ensureDeferred
async def test_a_partial_of_another_size_or_hash_is_discarded(server):
    data = os.urandom(200_000)
    client = await server.connect()
    first = await start_resumable(client, "f", data, 100_000, sha256=sha(data))
    await cut_file_channel(server, client)
    await client.reply(first)
    _, offset = await resume_offset(client, "f", len(data) + 1)
    assert offset == 0
    await cut_file_channel(server, client)


@pytest_twisted.ensureDeferred
async def test_a_partial_is_bound_to_its_client(server_factory, tmp_path):
    from wsfiles.users import UserDirectory, add_user

    path = str(tmp_path / "users")
    alice, bob = add_user(path, "alice"), add_user(path, "bob")
    srv = await server_factory(users=UserDirectory(path))
    local_only(srv, "byte-exact partials; the S3 backend keeps whole parts (test_s3_storage.py)")
    a, b = await srv.connect(alice), await srv.connect(bob)
    data = os.urandom(100_000)
    first = await start_resumable(a, "f", data, 50_000)
    await cut_file_channel(srv, a)
    await a.reply(first)
    _, offset = await resume_offset(b, "f", len(data))
    assert offset == 0
    await cut_file_channel(srv, b)
    _, offset = await resume_offset(a, "f", len(data))
    assert offset == 50_000
    await cut_file_channel(srv, a)


@pytest_twisted.ensureDeferred
async def test_expired_partials_are_swept(server):
    local_only(server, "byte-exact partials; the S3 backend keeps whole parts (test_s3_storage.py)")
    import time

    data = os.urandom(100_000)
    client = await server.connect()
    first = await start_resumable(client, "f", data, 50_000)
    await cut_file_channel(server, client)
    await client.reply(first)
    storage = server.site.command_factory.storage
    # The interruption fsyncs the partial in a thread; the sweeper leaves a
    # partial alone until that is done.
    await defer.gatherResults([_copy(d) for d in storage._settling.values()])
    assert storage.sweep_partials(3600) == 0
    assert storage.sweep_partials(3600, now=time.time() + 3601) == 1
    _, offset = await resume_offset(client, "f", len(data))
    assert offset == 0
    await cut_file_channel(server, client)


@pytest_twisted.ensureDeferred
async def test_a_resume_takes_over_an_upload_still_in_flight(server):
    local_only(server, "byte-exact partials; the S3 backend keeps whole parts (test_s3_storage.py)")
    data = os.urandom(300_000)
    stale = await server.connect()
    first = await start_resumable(stale, "f", data, 120_000)
    # The first connection looks alive but sends nothing more; the same
    # client comes back on a new connection and resumes.
    fresh = await server.connect()
    request_id, offset = await resume_offset(fresh, "f", len(data))
    assert (await stale.reply(first))["code"] == "superseded"
    assert offset == 120_000
    fresh.send_on_file_channel(data[offset:])
    assert (await fresh.reply(request_id))["sha256"] == sha(data)
    assert (await server.read("f")) == data


@pytest_twisted.ensureDeferred
async def test_partials_count_toward_the_quota(server_factory):
    srv = await server_factory(quota=150_000)
    local_only(srv, "byte-exact partials; the S3 backend keeps whole parts (test_s3_storage.py)")
    client = await srv.connect()
    data = os.urandom(100_000)
    first = await start_resumable(client, "big", data, 100_000 - 1)
    await cut_file_channel(srv, client)
    await client.reply(first)
    assert await refused(client.upload("other", b"x" * 60_000)) == "quota_exceeded"
    await client.upload("big", data, resume=True)  # its own partial does not count twice


# -- automatic resume through a connection that drops --------------------------------


class _Pipe(protocol.Protocol):
    def __init__(self, proxy: CuttingProxy) -> None:
        self.proxy = proxy
        self.peer: _Pipe | None = None
        self.buffer: list[bytes] = []
        self.lost: Deferred = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.proxy.count(len(data))
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.write(data)
        else:
            self.buffer.append(data)

    def connectionLost(self, reason: Any) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.loseConnection()
        self.lost.callback(None)


class _Inbound(_Pipe):
    def connectionMade(self) -> None:
        self.proxy.pipes.append(self)
        self.transport.pauseProducing()
        outbound = _Pipe(self.proxy)
        outbound.peer, self.peer = self, outbound
        self.proxy.pipes.append(outbound)
        endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", self.proxy.target)

        def connected(_: Any) -> None:
            for data in outbound.buffer:
                outbound.transport.write(data)
            outbound.buffer.clear()
            self.transport.resumeProducing()

        def failed(_: Any) -> None:
            self.transport.loseConnection()

        endpoints.connectProtocol(endpoint, outbound).addCallbacks(connected, failed)


class CuttingProxy(protocol.Factory):
    """A loopback TCP proxy that aborts every connection once, after N bytes."""

    def __init__(self, target: int, cut_after: int) -> None:
        self.target = target
        self.cut_after = cut_after
        self.moved = 0
        self.cuts = 0
        self.pipes: list[_Pipe] = []

    def buildProtocol(self, addr: Any) -> _Inbound:
        return _Inbound(self)

    def count(self, n: int) -> None:
        self.moved += n
        if self.cuts == 0 and self.moved >= self.cut_after:
            self.cuts = 1
            for pipe in list(self.pipes):
                if pipe.transport is not None:
                    pipe.transport.abortConnection()

    async def close(self) -> None:
        for pipe in self.pipes:
            if pipe.transport is not None and pipe.transport.connected:
                pipe.transport.loseConnection()
        await defer.gatherResults([p.lost for p in self.pipes if p.transport is not None])


@pytest_twisted.async_yield_fixture
async def proxied(server):
    proxy = CuttingProxy(int(server.url.rsplit(":", 1)[1]), cut_after=6 * 1024 * 1024)
    port = await endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(proxy)
    yield proxy, f"ws://127.0.0.1:{port.getHost().port}"
    await port.stopListening()
    await proxy.close()


@pytest_twisted.ensureDeferred
async def test_client_resumes_an_upload_cut_mid_transfer(server, proxied):
    from wsfiles.client import connect

    proxy, url = proxied
    data = os.urandom(16 * 1024 * 1024)
    client = await connect(url)
    server.clients.append(client)
    ack = await client.upload("big", data, resume=True)
    assert proxy.cuts == 1
    assert ack["sha256"] == sha(data)
    assert (await server.read("big")) == data


@pytest_twisted.ensureDeferred
async def test_client_resumes_a_download_cut_mid_transfer(server, proxied):
    from wsfiles.client import connect

    proxy, url = proxied
    data = os.urandom(16 * 1024 * 1024)
    await server.put("big", data)
    client = await connect(url)
    server.clients.append(client)
    sink = io.BytesIO()
    sent = await client.download("big", sink, resume=True)
    assert proxy.cuts == 1
    assert sent["sha256"] == sha(data) and sink.getvalue() == data


@pytest_twisted.ensureDeferred
async def test_after_a_crash_a_resume_offers_only_what_was_durable(twistd_factory):
    import json

    from twisted.internet import task

    from wsfiles.client import connect
    from wsfiles.storage.local import CHECKPOINT_BYTES

    srv = await twistd_factory()
    data = os.urandom(CHECKPOINT_BYTES + 16 * 1024 * 1024)
    client = await connect(srv.url)
    upload = defer.ensureDeferred(client.upload("big", data, resume=True, retries=0))
    partials = srv.root / ".wsfiles-partial" / "@anonymous"
    durable = 0
    # The server is another process: watch its partial's record, bounded.
    for _ in range(1500):
        records = list(partials.glob("*.json")) if partials.exists() else []
        if records:
            try:
                durable = json.loads(records[0].read_text()).get("durable", 0)
            except ValueError:
                durable = 0  # caught mid-rename
        if durable:
            break
        await task.deferLater(reactor, 0.02, lambda: None)
    assert durable >= CHECKPOINT_BYTES
    await srv.kill()
    assert await refused(upload) in ("channel_closed", "connection_failed")
    await client.close()

    again = await twistd_factory(root=srv.root)
    client = await connect(again.url)
    try:
        request_id, offset = await resume_offset(client, "big", len(data))
        assert offset == durable
        client.send_on_file_channel(data[offset:])
        assert (await client.reply(request_id))["sha256"] == sha(data)
        assert (again.root / "big").read_bytes() == data
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_a_chunked_save_takes_several_messages(server):
    data = os.urandom(250_000)
    client = await server.connect()
    message = {"op": "save", "name": "f", "size": len(data), "chunked": True}
    request_id = client.send(message)
    reply = await client.reply(request_id)
    await client._open_file_channel(reply["url"])
    assert (await client.reply(request_id))["op"] == "ready"
    for start in range(0, len(data), 100_000):
        client.send_on_file_channel(data[start : start + 100_000])
    ack = await client.reply(request_id)
    assert ack["op"] == "ack" and ack["sha256"] == sha(data)
    # Still exactly the declared size: one byte too many is refused.
    request_id = client.send({**message, "size": 3})
    assert (await client.reply(request_id))["op"] == "ready"
    client.send_on_file_channel(b"ab")
    client.send_on_file_channel(b"cd")
    assert (await client.reply(request_id))["code"] == "size_mismatch"
    assert (await server.read("f")) == data
