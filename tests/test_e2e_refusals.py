"""End-to-end tests of everything the server must refuse, over real loopback sockets.

Each refusal is checked from the outside: the error a client sees (code, and
the command's id when there is one), that nothing was stored (the folder on
disk, and the temporary folder ROOT/.wsfiles-tmp, which must be empty
afterwards), that the previous version of a file survives, and that the
connection is still usable after the refusal when the protocol says so.

No test sleeps: every wait is on an event and bounded with ``addTimeout``.
"""

from __future__ import annotations

import base64
import io
import json
import os
from collections.abc import Callable
from typing import Any

import pytest
import pytest_twisted
import treq
from e2e_helpers import (
    UNSOLICITED,
    KiB,
    MiB,
    blob,
    command_channels,
    local_only,
    next_reply,
    record,
    sha256,
    stray_notices,
    within,
)
from twisted.internet import defer, endpoints, protocol, reactor
from twisted.internet.defer import Deferred, DeferredQueue

from wsfiles.client import WsfilesClient, WsfilesError
from wsfiles.config import COMMAND_MESSAGE_LIMIT
from wsfiles.streaming import CHUNK_SIZE

# -- helpers ------------------------------------------------------------------


# These suites run against every storage backend (local folders, and S3 on a
# real Ceph RGW): they reach the stored files only through the storage
# interface (server.put, server.read, server.stored, server.leftovers).
pytestmark = pytest.mark.every_backend


async def next_notice(client: WsfilesClient) -> dict[str, Any]:
    """The next message that answers no command of ours (an error without id)."""
    while True:
        message = await within(client.notices.get())
        if message.get("op") not in UNSOLICITED:
            return message


def send_raw(client: WsfilesClient, text: str, request_id: Any = None) -> None:
    """Send ``text`` as is; with ``request_id``, its replies go to client.reply(id)."""
    if request_id is not None:
        client._replies[request_id] = DeferredQueue()
    client.send_text(text)


async def assert_usable(client: WsfilesClient, expected_names: list[str]) -> None:
    """The command channel still answers, and lists exactly ``expected_names``."""
    files = await within(client.list())
    assert [f["name"] for f in files] == expected_names


def server_side(server: Any, protocol: Any) -> list[Any]:
    """The server's tracked connection(s) whose peer is ``protocol``'s socket."""
    port = protocol.transport.getHost().port
    return [w for w in list(server.tracker.protocols) if w.transport.getPeer().port == port]


async def wait_closed_on_server(server: Any, wrappers: list[Any]) -> None:
    await within(defer.gatherResults([w.lost for w in wrappers]))


class TrippingSource(io.BytesIO):
    """Upload source that calls ``action`` (in the next reactor turn) once
    ``after`` bytes have been read from it: "in the middle of the upload"."""

    def __init__(self, data: bytes, after: int, action: Callable[[], None]) -> None:
        super().__init__(data)
        self.after = after
        self.action = action
        self.tripped: Deferred = Deferred()

    def read(self, size: int | None = -1) -> bytes:
        chunk = super().read(size)
        if not self.tripped.called and self.tell() >= self.after:
            self.tripped.callback(None)
            reactor.callLater(0, self.action)
        return chunk


class TrippingSink(io.BytesIO):
    """Download sink that calls ``action`` (in the next reactor turn) once it holds
    ``after`` bytes."""

    def __init__(self, after: int, action: Callable[[], None]) -> None:
        super().__init__()
        self.after = after
        self.action = action
        self.tripped: Deferred = Deferred()

    def write(self, data: Any) -> int:
        written = super().write(data)
        if not self.tripped.called and self.tell() >= self.after:
            self.tripped.callback(None)
            reactor.callLater(0, self.action)
        return written


def cut_file_channel(client: WsfilesClient, how: str) -> Callable[[], None]:
    def cut() -> None:
        protocol = client._file
        assert protocol is not None, "no file channel to cut"
        if how == "abort":
            protocol.transport.abortConnection()
        else:
            protocol.sendClose(1000)

    return cut


# -- save larger than max_size ------------------------------------------------


@pytest.mark.parametrize("size", [1001, 10**30])
@pytest_twisted.ensureDeferred
async def test_save_over_max_size_is_too_large_without_a_channel(server_factory, size):
    srv = await server_factory(max_size=1000)
    client = await srv.connect()
    log = record(client)

    request_id = client.send({"op": "save", "name": "big", "size": size})
    error = await next_reply(client, request_id)
    assert error["op"] == "error"
    assert error["code"] == "too_large"
    assert error["id"] == request_id

    await assert_usable(client, [])
    assert [m["op"] for m in log] == ["error", "list"]  # no channel, no ready
    assert not client.has_file_channel
    assert srv.site.registry.pending_tickets == 0
    assert await srv.stored() == {}
    assert await srv.leftovers() == []

    # exactly max_size is allowed
    ack = await within(client.upload("max", b"m" * 1000))
    assert ack["size"] == 1000


@pytest_twisted.ensureDeferred
async def test_client_upload_over_max_size_raises_too_large(server_factory):
    srv = await server_factory(max_size=1000)
    client = await srv.connect()
    with pytest.raises(WsfilesError) as caught:
        await within(client.upload("big", b"x" * 1001))
    assert caught.value.code == "too_large"
    assert not client.has_file_channel
    assert await srv.stored() == {}


# -- more bytes than declared -------------------------------------------------


async def _upload_more_than_declared(
    srv: Any, data: bytes, declared: int, expected_codes: set[str]
) -> None:
    """Upload ``data`` declaring ``declared`` bytes, over a v1 of the same name."""
    client = await srv.connect()
    v1 = b"version one"
    await within(client.upload("doc.bin", v1))
    log = record(client)
    file_factory = client._file_factory
    assert file_factory is not None and client._file is not None
    (server_file_channel,) = server_side(srv, client._file)

    with pytest.raises(WsfilesError) as caught:
        await within(client.upload("doc.bin", data, size=declared))
    assert caught.value.code in expected_codes
    error = caught.value.reply
    assert error is not None
    request_id = error["id"]

    # The server closes the file channel with 1009 (docs/protocol.md)
    assert await within(file_factory.closed) == 1009
    assert client.file_close_codes == [1009]
    await within(server_file_channel.lost)
    await assert_usable(client, ["doc.bin"])
    assert await srv.stored() == {"doc.bin": v1}
    assert await srv.leftovers() == []

    await within(client.upload("next.bin", b"next"))
    assert await srv.stored() == {"doc.bin": v1, "next.bin": b"next"}
    # never an ack for the refused save, not even late
    assert [m["op"] for m in log if m.get("id") == request_id] == ["ready", "error"]
    assert await srv.leftovers() == []


@pytest_twisted.ensureDeferred
async def test_more_bytes_than_declared_is_size_mismatch(server):
    # 300 KiB in 128 KiB frames, declared 1000: refused at the first frame
    await _upload_more_than_declared(server, blob(300 * KiB, 1), 1000, {"size_mismatch"})


@pytest_twisted.ensureDeferred
async def test_a_few_bytes_more_than_declared_is_size_mismatch(server):
    # one small frame, one byte too many
    await _upload_more_than_declared(server, b"0123456789", 9, {"size_mismatch"})


@pytest_twisted.ensureDeferred
async def test_more_bytes_than_declared_and_over_max_size_is_too_large(server_factory):
    srv = await server_factory(max_size=300 * KiB)
    # declared exactly max_size, then 400 KiB in 128 KiB frames: the third frame
    # takes the bytes past both the declared size and max_size -> too_large
    await _upload_more_than_declared(srv, blob(400 * KiB, 2), 300 * KiB, {"too_large"})


@pytest_twisted.ensureDeferred
async def test_one_frame_larger_than_max_size_is_too_large(server_factory):
    srv = await server_factory(max_size=1000)
    # declared 10 bytes, then one frame of 5000 bytes (> max_size)
    await _upload_more_than_declared(srv, b"y" * 5000, 10, {"too_large"})


@pytest_twisted.ensureDeferred
async def test_next_upload_right_after_an_oversized_one_works(server):
    client = await server.connect()
    await within(client.upload("doc.bin", b"v1"))
    with pytest.raises(WsfilesError) as caught:
        await within(client.upload("doc.bin", b"0123456789" * 1000, size=9))
    assert caught.value.code == "size_mismatch"
    # at once, as any client would: the error is all it was told
    ack = await within(client.upload("next.bin", b"next"))
    assert ack["op"] == "ack"
    assert await server.stored() == {"doc.bin": b"v1", "next.bin": b"next"}


@pytest_twisted.ensureDeferred
async def test_fewer_bytes_than_declared_is_size_mismatch_and_channel_stays(server):
    client = await server.connect()
    v1 = blob(200 * KiB, 3)
    await within(client.upload("doc.bin", v1))
    file_channel = client._file

    with pytest.raises(WsfilesError) as caught:
        await within(client.upload("doc.bin", b"short", size=5000))
    assert caught.value.code == "size_mismatch"
    with pytest.raises(WsfilesError) as caught:
        await within(client.upload("doc.bin", blob(3 * CHUNK_SIZE, 4), size=4 * CHUNK_SIZE))
    assert caught.value.code == "size_mismatch"

    assert await server.stored() == {"doc.bin": v1}
    assert await server.leftovers() == []
    # the same file channel carries the next upload
    ack = await within(client.upload("next.bin", b"next"))
    assert ack["sha256"] == sha256(b"next")
    assert client._file is file_channel
    assert client.file_close_codes == []
    assert await server.stored() == {"doc.bin": v1, "next.bin": b"next"}


# -- data on the wrong channel ------------------------------------------------


@pytest.mark.parametrize("size", [16, 60 * KiB, 1 * MiB, 8 * MiB])
@pytest_twisted.ensureDeferred
async def test_binary_on_the_command_channel_is_wrong_channel(server, size):
    """Whatever its size (a file sent to the wrong place): refused, dropped as it
    comes, and the command channel carries on."""
    client = await server.connect()
    client.send_binary_on_command(blob(size, 5))
    error = await next_notice(client)
    assert error["op"] == "error"
    assert error["code"] == "wrong_channel"
    assert "id" not in error
    await assert_usable(client, [])
    assert await server.stored() == {}
    assert await server.leftovers() == []
    assert client.close_code is None
    await within(client.upload("after", b"ok"))


@pytest_twisted.ensureDeferred
async def test_text_over_the_command_limit_is_closed_with_1009(server):
    """Commands are small: a text message over 64 KiB closes the command channel
    with 1009 as soon as its length is known; other clients carry on."""
    keeper = await server.connect()
    client = await server.connect()
    command_factory = client._command_factory
    assert command_factory is not None
    padding = "x" * (COMMAND_MESSAGE_LIMIT + 1)
    client.send_text(json.dumps({"op": "list", "padding": padding}))
    assert await within(command_factory.closed) == 1009
    assert client.close_code == 1009
    await assert_usable(keeper, [])


def command_channel_ends(server: Any, client: WsfilesClient) -> tuple[Any, Any]:
    """The server's end (its only command channel) and the client's end."""
    (ours,) = command_channels(server)
    assert client._command is not None
    return ours, client._command


async def all_read(protocol: Any) -> None:
    """Ping and await the pong: the peer has read every frame sent before it."""
    pong: Deferred = Deferred()
    protocol.onPong = pong.callback
    protocol.sendPing(b"sync")
    await within(pong)


@pytest_twisted.ensureDeferred
async def test_binary_on_the_command_channel_is_dropped_as_it_arrives(server):
    """A fragmented binary message on the command channel: refused at its first
    frame, and none of its bytes are kept while the rest arrives."""
    client = await server.connect()
    command, protocol = command_channel_ends(server, client)
    protocol.beginMessage(isBinary=True)
    for part in range(4):
        protocol.sendMessageFrame(blob(MiB, 20 + part))
    await all_read(protocol)
    assert command.message_data == [] and not command.frame_data
    error = await next_notice(client)
    assert error["code"] == "wrong_channel"
    protocol.endMessage()
    await assert_usable(client, [])
    assert await server.stored() == {}


@pytest_twisted.ensureDeferred
async def test_empty_fragments_of_a_command_are_not_kept(server):
    """Empty continuation frames are legal but carry nothing: the server keeps
    nothing for them (Autobahn kept a list entry each, without bound), and the
    command they belong to runs when its last frame arrives."""
    client = await server.connect()
    command, protocol = command_channel_ends(server, client)
    protocol.beginMessage(isBinary=False)
    protocol.sendMessageFrame(b'{"op": "list", ')
    for _ in range(20_000):
        protocol.sendMessageFrame(b"")
    await all_read(protocol)
    assert len(command.message_data) == 1  # the one non-empty fragment
    client._replies["after"] = DeferredQueue()
    protocol.sendMessageFrame(b'"id": "after"}')
    protocol.endMessage()
    assert await next_reply(client, "after") == {"op": "list", "files": [], "id": "after"}


@pytest_twisted.ensureDeferred
async def test_text_on_the_file_channel_is_wrong_channel_and_not_executed(server):
    client = await server.connect()
    await within(client.upload("seed", b"seed"))  # sets up the file channel
    file_channel = client._file
    log = record(client)

    command = {"op": "save", "name": "evil", "size": 3, "id": "from-file-channel"}
    client.send_on_file_channel(json.dumps(command).encode(), binary=False)
    error = await next_notice(client)
    assert error["op"] == "error"
    assert error["code"] == "wrong_channel"
    assert "id" not in error

    await assert_usable(client, ["seed"])
    client.send_on_file_channel(json.dumps({"op": "list", "id": 99}).encode(), binary=False)
    assert (await next_notice(client))["code"] == "wrong_channel"
    await assert_usable(client, ["seed"])
    # only the errors and our own lists: the texts were not run
    assert [m["op"] for m in log] == ["error", "list", "error", "list"]
    assert stray_notices(client) == []
    assert await server.stored() == {"seed": b"seed"}
    assert await server.leftovers() == []
    # the file channel stays open and works
    await within(client.upload("after", b"after"))
    assert client._file is file_channel
    assert client.file_close_codes == []


@pytest_twisted.ensureDeferred
async def test_binary_on_the_file_channel_without_a_save_is_unexpected_data(server):
    client = await server.connect()
    await within(client.upload("seed", b"seed"))
    file_channel = client._file

    client.send_on_file_channel(blob(200 * KiB, 7))
    error = await next_notice(client)
    assert error["op"] == "error"
    assert error["code"] == "unexpected_data"
    assert "id" not in error

    await assert_usable(client, ["seed"])
    assert await server.stored() == {"seed": b"seed"}
    assert await server.leftovers() == []
    # the same file channel carries the next upload and download
    data = blob(300 * KiB, 8)
    ack = await within(client.upload("after", data))
    assert ack["sha256"] == sha256(data)
    sink = io.BytesIO()
    await within(client.download("after", sink))
    assert sink.getvalue() == data
    assert client._file is file_channel
    assert client.file_close_codes == []
    assert stray_notices(client) == []


# -- connections cut in the middle of a transfer ------------------------------


@pytest.mark.parametrize("how", ["abort", "close"])
@pytest_twisted.ensureDeferred
async def test_file_channel_cut_during_upload(server, how):
    client = await server.connect()
    v1 = blob(100 * KiB, 9)
    await within(client.upload("doc.bin", v1))
    log = record(client)

    source = TrippingSource(blob(16 * MiB, 10), 2 * MiB, cut_file_channel(client, how))
    with pytest.raises(WsfilesError) as caught:
        await within(client.upload("doc.bin", source))
    assert source.tripped.called
    assert caught.value.code == "channel_closed"
    assert caught.value.reply is not None
    assert caught.value.reply["id"] is not None  # the server's error about that save

    assert await server.stored() == {"doc.bin": v1}
    assert await server.leftovers() == []
    await assert_usable(client, ["doc.bin"])

    # the next save is offered a new channel, which works
    assert not client.has_file_channel
    v3 = blob(50 * KiB, 11)
    await within(client.upload("doc.bin", v3))
    assert [m["op"] for m in log].count("channel") == 1
    assert await server.stored() == {"doc.bin": v3}
    assert await server.leftovers() == []


@pytest.mark.parametrize("how", ["abort", "close"])
@pytest_twisted.ensureDeferred
async def test_file_channel_cut_during_download(server, how):
    data = blob(32 * MiB, 12)
    await server.put("big.bin", data)
    client = await server.connect()
    log = record(client)
    sink = TrippingSink(256 * KiB, cut_file_channel(client, how))
    with pytest.raises(WsfilesError) as caught:
        await within(client.download("big.bin", sink))
    assert sink.tripped.called
    assert caught.value.code == "channel_closed"
    assert caught.value.reply is not None  # reported by the server, about that get
    assert caught.value.reply["id"] is not None
    await assert_usable(client, ["big.bin"])

    # the next get is offered a new channel, which works
    small = blob(10 * KiB, 13)
    await server.put("small.bin", small)
    out = io.BytesIO()
    await within(client.download("small.bin", out))
    assert out.getvalue() == small
    assert [m["op"] for m in log].count("channel") == 2
    assert (await server.stored())["big.bin"] == data


@pytest_twisted.ensureDeferred
async def test_file_rewritten_during_its_download_is_storage_error_never_a_stale_sent(server):
    """The server sends the SHA-256 it recorded at upload; a file another program
    rewrites in place while it goes out must fail the get (storage_error), not
    end with a ``sent`` whose hash describes bytes that are no longer there."""
    local_only(server, "rewrites the stored file in place, behind the server's back")
    data = blob(32 * MiB, 14)
    client = await server.connect()
    await within(client.upload("big.bin", data))  # the upload records its SHA-256
    path = server.folder() / "big.bin"

    def rewrite_first_byte() -> None:
        with path.open("r+b") as f:
            f.write(b"Y")
        stamp = path.stat().st_mtime_ns + 1_000_000  # a clearly newer mtime
        os.utime(path, ns=(stamp, stamp))

    sink = TrippingSink(256 * KiB, rewrite_first_byte)
    with pytest.raises(WsfilesError) as caught:
        await within(client.download("big.bin", sink))
    assert sink.tripped.called
    assert caught.value.code == "storage_error"
    assert caught.value.reply is not None and caught.value.reply["id"] is not None
    await assert_usable(client, ["big.bin"])

    # The server altered nothing, and the next get sends the file as it now is.
    rewritten = b"Y" + data[1:]
    assert path.read_bytes() == rewritten
    out = io.BytesIO()
    reply = await within(client.download("big.bin", out))
    assert out.getvalue() == rewritten
    assert reply["sha256"] == sha256(rewritten)


@pytest_twisted.ensureDeferred
async def test_command_channel_aborted_during_upload(server):
    keeper = await server.connect()
    v1 = blob(100 * KiB, 14)
    await within(keeper.upload("doc.bin", v1))

    client = await server.connect()
    await within(client.upload("warmup", b"w"))  # sets up the file channel
    assert client._command is not None and client._file is not None
    server_connections = server_side(server, client._command) + server_side(server, client._file)
    assert len(server_connections) == 2

    def cut() -> None:
        assert client._command is not None
        client._command.transport.abortConnection()

    source = TrippingSource(blob(16 * MiB, 15), 2 * MiB, cut)
    with pytest.raises(WsfilesError) as caught:
        await within(client.upload("doc.bin", source))
    assert caught.value.code == "channel_closed"
    assert source.tripped.called

    # the server notices both channels are gone (it closes the file channel itself)
    await wait_closed_on_server(server, server_connections)
    assert await server.leftovers() == []
    assert await server.stored() == {"doc.bin": v1, "warmup": b"w"}
    await assert_usable(keeper, ["doc.bin", "warmup"])
    out = io.BytesIO()
    await within(keeper.download("doc.bin", out))
    assert out.getvalue() == v1


@pytest_twisted.ensureDeferred
async def test_client_closes_cleanly_after_its_command_channel_was_cut_mid_upload(server):
    """Regression: WsfilesClient._command_closed used to iterate ``_replies`` while
    the errors it put() resumed requests that delete their entries (RuntimeError
    in onClose, so ``closed`` never fired and ``close()`` hung)."""
    client = await server.connect()
    command_factory = client._command_factory
    assert command_factory is not None
    await within(client.upload("warmup", b"w"))

    def cut() -> None:
        assert client._command is not None
        client._command.transport.abortConnection()

    source = TrippingSource(blob(16 * MiB, 16), 2 * MiB, cut)
    with pytest.raises(WsfilesError) as caught:
        await within(client.upload("doc.bin", source))
    assert caught.value.code == "channel_closed"
    # client.close() waits for this; the command channel is long gone
    await within(command_factory.closed, 2)
    await within(client.close())


@pytest_twisted.ensureDeferred
async def test_file_channel_aborted_before_the_data_leaves_nothing(server):
    """The save was ready, then the file channel vanished before any byte."""
    client = await server.connect()
    await within(client.upload("seed", b"seed"))
    request_id = client.send({"op": "save", "name": "doc.bin", "size": 10})
    assert (await next_reply(client, request_id))["op"] == "ready"
    assert len(await server.leftovers()) <= 1
    assert client._file is not None
    wrappers = server_side(server, client._file)
    client._file.transport.abortConnection()
    error = await next_reply(client, request_id)
    assert error["op"] == "error"
    assert error["code"] == "channel_closed"
    await wait_closed_on_server(server, wrappers)
    assert await server.leftovers() == []
    assert await server.stored() == {"seed": b"seed"}


# -- bad commands -------------------------------------------------------------

# (text sent, the id the reply must carry or None, expected code)
BAD_COMMANDS = [
    ("not json", None, "bad_request"),
    ("{'op': 'list'}", None, "bad_request"),
    ("", None, "bad_request"),
    ("[1, 2]", None, "bad_request"),
    ('["list"]', None, "bad_request"),
    ('"list"', None, "bad_request"),
    ("42", None, "bad_request"),
    ("null", None, "bad_request"),
    ("[" * 30000 + "]" * 30000, None, "bad_request"),
    ("{}", None, "bad_request"),
    ('{"id": 5}', 5, "bad_request"),
    ('{"op": 5, "id": 5}', 5, "bad_request"),
    ('{"op": null, "id": 5}', 5, "bad_request"),
    ('{"op": ["list"], "id": 5}', 5, "bad_request"),
    ('{"op": "frobnicate", "id": 5}', 5, "unknown_op"),
    ('{"op": "LIST", "id": "u"}', "u", "unknown_op"),
    ('{"op": "", "id": 5}', 5, "unknown_op"),
    ('{"op": "list", "id": true}', None, "bad_request"),
    ('{"op": "list", "id": false}', None, "bad_request"),
    ('{"op": "list", "id": 1.5}', None, "bad_request"),
    ('{"op": "list", "id": [1]}', None, "bad_request"),
    ('{"op": "list", "id": {"a": 1}}', None, "bad_request"),
    ('{"op": "save", "name": "f", "size": 1.0, "id": 5}', 5, "bad_request"),
    ('{"op": "save", "name": "f", "size": 1e3, "id": 5}', 5, "bad_request"),
    ('{"op": "save", "name": "f", "size": -1, "id": 5}', 5, "bad_request"),
    ('{"op": "save", "name": "f", "id": 5}', 5, "bad_request"),
    ('{"op": "save", "name": "f", "size": null, "id": 5}', 5, "bad_request"),
    ('{"op": "save", "name": "f", "size": "10", "id": 5}', 5, "bad_request"),
    ('{"op": "save", "name": "f", "size": true, "id": 5}', 5, "bad_request"),
    ('{"op": "save", "size": 1, "id": 5}', 5, "bad_request"),
    ('{"op": "save", "name": 7, "size": 1, "id": 5}', 5, "bad_request"),
    ('{"op": "save", "name": null, "size": 1, "id": 5}', 5, "bad_request"),
    ('{"op": "save", "name": ["f"], "size": 1, "id": 5}', 5, "bad_request"),
    ('{"op": "get", "id": 5}', 5, "bad_request"),
    ('{"op": "get", "name": 7, "id": 5}', 5, "bad_request"),
    ('{"op": "get", "name": "missing", "id": 5}', 5, "not_found"),
    ('{"op": "get", "name": "missing", "id": "g"}', "g", "not_found"),
]


@pytest.mark.parametrize(
    ("text", "request_id", "code"),
    BAD_COMMANDS,
    ids=[f"{i}-{text[:30]}" for i, (text, _, _) in enumerate(BAD_COMMANDS)],
)
@pytest_twisted.ensureDeferred
async def test_bad_command_is_refused_and_the_connection_stays_usable(
    server, text, request_id, code
):
    client = await server.connect()
    log = record(client)
    send_raw(client, text, request_id)
    if request_id is None:
        error = await next_notice(client)
        assert "id" not in error
    else:
        error = await next_reply(client, request_id)
        assert error["id"] == request_id
    assert error["op"] == "error"
    assert error["code"] == code
    assert isinstance(error["message"], str)

    await assert_usable(client, [])
    assert [m["op"] for m in log] == ["error", "list"]
    assert not client.has_file_channel
    assert await server.stored() == {}
    assert await server.leftovers() == []
    await within(client.upload("after", b"ok"))
    assert await server.stored() == {"after": b"ok"}


INVALID_NAMES = {
    "empty": "",
    "slash": "a/b",
    "leading slash": "/etc",
    "traversal": "../x",
    "backslash": "a\\b",
    "nul": "a\x00b",
    "control 0x01": "a\x01",
    "tab": "a\tb",
    "newline": "a\nb",
    "escape": "\x1b[31mred",
    "del 0x7f": "a\x7f",
    "c1 next line 0x85": "a\x85b",
    "c1 escape 0x9b": "\x9b31mred",
    "dot": ".",
    "dotdot": "..",
    "reserved temp folder": ".wsfiles-tmp",
    "reserved prefix": ".wsfiles-anything",
    "256 ascii bytes": "a" * 256,
    "256 utf-8 bytes": "é" * 128,
    "lone surrogate": "\ud800",
}


@pytest.mark.parametrize("op", ["save", "get"])
@pytest.mark.parametrize("name", list(INVALID_NAMES.values()), ids=list(INVALID_NAMES))
@pytest_twisted.ensureDeferred
async def test_invalid_name_is_refused(server, op, name):
    client = await server.connect()
    message = {"op": op, "name": name, "id": "n"}
    if op == "save":
        message["size"] = 3
    send_raw(client, json.dumps(message), "n")
    error = await next_reply(client, "n")
    assert error["op"] == "error"
    assert error["code"] == "invalid_name"
    assert error["id"] == "n"
    await assert_usable(client, [])
    assert not client.has_file_channel
    assert await server.stored() == {}
    assert await server.leftovers() == []


@pytest.mark.parametrize(
    "name",
    [
        "a" * 255,
        "é" * 127 + "a",
        ".wsfiles",
        ".hidden",
        "...",
        "a.b.c",
        "sp ace",
        "中文",
        "nbsp\xa0after-c1",
    ],
)
@pytest_twisted.ensureDeferred
async def test_valid_names_near_the_rules_are_accepted(server, name):
    client = await server.connect()
    await within(client.upload(name, b"ok"))
    await assert_usable(client, [name])
    assert await server.stored() == {name: b"ok"}


# -- tickets ------------------------------------------------------------------


async def handshake_status(server: Any, path: str) -> int:
    """Status of a WebSocket opening handshake for ``path`` (HTTP GET with upgrade)."""
    url = server.url.replace("ws://", "http://", 1) + path
    headers = {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(),
        "Sec-WebSocket-Version": "13",
    }
    response = await within(treq.get(url, headers=headers, persistent=False))
    await within(response.content())
    return response.code


class _RawHandshake(protocol.Protocol):
    """Sends one WebSocket upgrade request; reports the status line, then hangs up."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.received = b""
        self.status: Deferred = Deferred()
        self.lost: Deferred = Deferred()

    def connectionMade(self) -> None:
        self.local_port = self.transport.getHost().port
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if b"\r\n" in self.received and not self.status.called:
            self.status.callback(self.received.split(b"\r\n", 1)[0].decode("latin-1"))
            self.transport.loseConnection()

    def connectionLost(self, reason: Any = None) -> None:
        if not self.status.called:
            self.status.errback(ConnectionError(f"closed without a status line: {reason}"))
        self.lost.callback(None)


async def raw_handshake_status_line(server: Any, path: str) -> str:
    """The status line the server answers a raw-socket upgrade request for ``path``."""
    host_port = server.url.removeprefix("ws://")
    host, port = host_port.split(":")
    request = (
        f"GET {path} HTTP/1.1\r\n"
        f"Host: {host_port}\r\n"
        "Upgrade: websocket\r\n"
        "Connection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}\r\n"
        "Sec-WebSocket-Version: 13\r\n"
        "\r\n"
    ).encode()
    handshake = _RawHandshake(request)
    endpoint = endpoints.TCP4ClientEndpoint(reactor, host, int(port))
    await within(endpoints.connectProtocol(endpoint, handshake))
    try:
        status_line = await within(handshake.status)
        # The server's end of this connection, to wait until it has noticed the
        # hang-up (none left: the server has already dropped it, as after a 403).
        server_ends = [
            w
            for w in list(server.tracker.protocols)
            if w.transport.getPeer().port == handshake.local_port
        ]
    finally:
        await within(handshake.lost)
    await wait_closed_on_server(server, server_ends)
    return status_line


async def ticket_url_of_a_get(client: WsfilesClient, name: str) -> tuple[int, str]:
    request_id = client.send({"op": "get", "name": name})
    channel = await next_reply(client, request_id)
    assert channel["op"] == "channel"
    assert channel["url"].startswith("/file?ticket=")
    return request_id, channel["url"]


@pytest_twisted.ensureDeferred
async def test_file_channel_without_a_ticket_is_refused_403(server):
    assert await handshake_status(server, "/file") == 403
    assert await handshake_status(server, "/file?ticket=") == 403
    assert await handshake_status(server, "/file?other=1") == 403


@pytest_twisted.ensureDeferred
async def test_file_channel_with_a_garbage_ticket_is_refused_403(server):
    assert await handshake_status(server, "/file?ticket=garbage") == 403
    assert await handshake_status(server, "/file?ticket=" + "A" * 22) == 403
    assert await handshake_status(server, "/file?ticket=%00%ff") == 403


@pytest_twisted.ensureDeferred
async def test_used_ticket_is_refused_403(server):
    await server.put("f", b"data")
    client = await server.connect()
    log = record(client)
    out = io.BytesIO()
    await within(client.download("f", out))  # uses the ticket
    (url,) = [m["url"] for m in log if m["op"] == "channel"]
    assert await handshake_status(server, url) == 403
    assert (await raw_handshake_status_line(server, url)).startswith("HTTP/1.1 403")
    # the first channel is unharmed by the refused second one
    out = io.BytesIO()
    await within(client.download("f", out))
    assert out.getvalue() == b"data"
    assert client.file_close_codes == []


@pytest_twisted.ensureDeferred
async def test_a_ticket_admits_exactly_one_handshake(server):
    """The raw handshake the refusals use is a valid one: a fresh ticket gets 101."""
    await server.put("f", b"data")
    client = await server.connect()
    request_id, url = await ticket_url_of_a_get(client, "f")
    assert (await raw_handshake_status_line(server, url)).startswith("HTTP/1.1 101")
    assert (await raw_handshake_status_line(server, url)).startswith("HTTP/1.1 403")
    # The raw channel took the get and hung up: the get ends one way or the
    # other (the 4 bytes may have gone out before the hang-up was noticed) ...
    ops = [(await next_reply(client, request_id))["op"]]
    while ops[-1] not in ("sent", "error"):
        ops.append((await next_reply(client, request_id))["op"])
    # ... and the next get works, over a new channel
    out = io.BytesIO()
    await within(client.download("f", out))
    assert out.getvalue() == b"data"


@pytest_twisted.ensureDeferred
async def test_expired_ticket_is_refused_403_after_channel_timeout(server_factory):
    srv = await server_factory(channel_timeout=0.5)
    await srv.put("f", b"data")
    client = await srv.connect()
    request_id, url = await ticket_url_of_a_get(client, "f")
    error = await next_reply(client, request_id)  # after channel_timeout
    assert error["code"] == "channel_timeout"
    assert await handshake_status(srv, url) == 403
    assert srv.site.registry.pending_tickets == 0


@pytest.mark.parametrize("op", ["get", "save"])
@pytest_twisted.ensureDeferred
async def test_channel_timeout_when_the_offered_channel_is_never_opened(server_factory, op):
    srv = await server_factory(channel_timeout=0.5)
    await srv.put("f", b"data")
    client = await srv.connect()
    log = record(client)
    if op == "get":
        request_id = client.send({"op": "get", "name": "f"})
    else:
        request_id = client.send({"op": "save", "name": "g", "size": 4})
    channel = await next_reply(client, request_id)
    assert channel["op"] == "channel"
    # ... and simply don't connect
    error = await within(client.reply(request_id), 5)
    assert error["op"] == "error"
    assert error["code"] == "channel_timeout"
    assert error["id"] == request_id
    assert [m["op"] for m in log] == ["channel", "error"]
    assert not client.has_file_channel
    assert await srv.leftovers() == []

    # the connection stays usable; the next transfer is offered a new channel
    await assert_usable(client, ["f"])
    out = io.BytesIO()
    await within(client.download("f", out))
    assert out.getvalue() == b"data"
    await within(client.upload("g", b"gggg"))
    assert [m["op"] for m in log].count("channel") == 2
    assert await srv.stored() == {"f": b"data", "g": b"gggg"}
