"""End-to-end tests of the wire protocol's happy paths, over real loopback sockets.

Every test talks to the in-process ``server`` fixture through real TCP
connections: with the project's own client (wsfiles.client) and, once, with
an independent WebSocket implementation (the ``websockets`` library) so the
server is not only ever checked against the client written alongside it.

No test sleeps: every wait is on an event (a reply, a Deferred) and every
wait is bounded with ``Deferred.addTimeout``.
"""

from __future__ import annotations

import asyncio
import io
import json
from typing import Any

import pytest
import pytest_twisted
from e2e_helpers import (
    UNSOLICITED,
    MiB,
    blob,
    local_only,
    next_reply,
    open_channel,
    record,
    sha256,
    stray_notices,
    within,
)
from twisted.internet import defer, reactor, threads
from twisted.internet.defer import DeferredQueue

from wsfiles.client import WsfilesClient, _Download
from wsfiles.config import SUBPROTOCOL
from wsfiles.streaming import CHUNK_SIZE

# -- helpers ------------------------------------------------------------------


# These suites run against every storage backend (local folders, and S3 on a
# real Ceph RGW): they reach the stored files only through the storage
# interface (server.put, server.read, server.stored, server.leftovers).
pytestmark = pytest.mark.every_backend


def send_raw(client: WsfilesClient, message: dict[str, Any]) -> Any:
    """Send ``message`` as is, its own ``id`` included; replies go to client.reply(id).

    ``client.send`` always picks a fresh integer id; this is how a test
    sends string ids, or ids the test chooses.
    """
    request_id = message["id"]
    client._replies[request_id] = DeferredQueue()
    client.send_text(json.dumps(message))
    return request_id


def arm_download(client: WsfilesClient) -> _Download:
    """Catch the next binary message of the file channel (for low-level ``get``)."""
    download = client._download = _Download(io.BytesIO())
    return download


# -- hello and list -----------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_hello_lists_existing_files_sorted_by_code_point(server_factory):
    srv_probe = await server_factory()
    local_only(srv_probe, "compares sizes and times with the files on disk")
    srv = await server_factory(max_size=123_456)
    names = ["é", "a", "B", "Z", "_", "10", "9", "ä", "中文", "b b", "A"]
    for i, name in enumerate(names):
        await srv.put(name, b"x" * i)

    client = await srv.connect()
    hello = client.hello
    # (a newer server may add keys, e.g. protocol 1.1's "features")
    assert {"op", "protocol", "client", "max_size", "files"} <= set(hello)
    assert hello["op"] == "hello"
    assert hello["protocol"] == 1
    assert hello["client"] == "anonymous"
    assert hello["max_size"] == 123_456
    listed = [f["name"] for f in hello["files"]]
    assert listed == sorted(names)  # Python sorts str by code point
    assert listed[:6] == ["10", "9", "A", "B", "Z", "_"]
    assert listed.index("B") < listed.index("a") < listed.index("é")
    for entry in hello["files"]:
        assert set(entry) == {"name", "size", "mtime"}
        path = srv.folder() / entry["name"]
        assert entry["size"] == path.stat().st_size == names.index(entry["name"])
        assert isinstance(entry["mtime"], int | float)
        assert entry["mtime"] == pytest.approx(path.stat().st_mtime, abs=1e-3)

    assert await within(client.list()) == hello["files"]


@pytest_twisted.ensureDeferred
async def test_hello_on_an_empty_folder_and_list_after_uploads(server):
    client = await server.connect()
    assert client.hello["files"] == []
    assert client.hello["max_size"] == 1024**3  # the default

    for name in ["é", "a", "B"]:
        await within(client.upload(name, name.encode()))
    files = await within(client.list())
    assert [f["name"] for f in files] == ["B", "a", "é"]
    assert [f["size"] for f in files] == [1, 1, 2]

    # a new connection's hello sees them too, in the same order
    other = await server.connect()
    assert [f["name"] for f in other.hello["files"]] == ["B", "a", "é"]


# -- ids ------------------------------------------------------------------------


@pytest.mark.parametrize("request_id", ["req-é 1", 4242, 0, "", -7])
@pytest_twisted.ensureDeferred
async def test_id_is_echoed_on_every_message_about_a_command(server, request_id):
    client = await server.connect()
    log = record(client)
    data = blob(CHUNK_SIZE * 2 + 17, seed=1)

    # list
    send_raw(client, {"op": "list", "id": request_id})
    reply = await next_reply(client, request_id)
    assert reply == {"op": "list", "files": [], "id": request_id}

    # save: channel, ready, ack
    send_raw(client, {"op": "save", "name": "f.bin", "size": len(data), "id": request_id})
    channel = await next_reply(client, request_id)
    assert channel["op"] == "channel"
    assert channel["id"] == request_id
    await open_channel(client, channel["url"])
    ready = await next_reply(client, request_id)
    assert ready == {"op": "ready", "id": request_id}
    client.send_on_file_channel(data)
    ack = await next_reply(client, request_id)
    assert ack == {
        "op": "ack",
        "name": "f.bin",
        "size": len(data),
        "sha256": sha256(data),
        "id": request_id,
    }

    # get: sending, (binary), sent
    download = arm_download(client)
    send_raw(client, {"op": "get", "name": "f.bin", "id": request_id})
    sending = await next_reply(client, request_id)
    assert sending == {"op": "sending", "name": "f.bin", "size": len(data), "id": request_id}
    sent = await next_reply(client, request_id)
    assert sent == {
        "op": "sent",
        "name": "f.bin",
        "size": len(data),
        "sha256": sha256(data),
        "id": request_id,
    }
    await within(download.done)
    assert download.sink.getvalue() == data

    # errors about a command carry its id too
    for bad in (
        {"op": "get", "name": "missing"},
        {"op": "save", "name": "x", "size": 1.5},
        {"op": "save", "name": "../x", "size": 1},
        {"op": "frobnicate"},
    ):
        send_raw(client, {**bad, "id": request_id})
        error = await next_reply(client, request_id)
        assert error["op"] == "error"
        assert error["id"] == request_id

    # nothing arrived without the id (apart from hello, which is not recorded)
    assert all(message.get("id") == request_id for message in log)
    assert stray_notices(client) == []


# -- sizes ------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_file_larger_than_a_frame_both_ways_byte_exact(server):
    data = blob(3 * MiB + 12_345, seed=3)
    client = await server.connect()

    ack = await within(client.upload("big.bin", data))
    assert ack["op"] == "ack"
    assert ack["name"] == "big.bin"
    assert ack["size"] == len(data)
    assert ack["sha256"] == sha256(data)
    assert (await server.read("big.bin")) == data
    assert await server.leftovers() == []

    sink = io.BytesIO()
    sent = await within(client.download("big.bin", sink))
    assert sent["size"] == len(data)
    assert sent["sha256"] == sha256(data)
    assert sink.getvalue() == data

    files = await within(client.list())
    assert [(f["name"], f["size"]) for f in files] == [("big.bin", len(data))]


@pytest_twisted.ensureDeferred
async def test_empty_file_upload(server):
    """The server stores a 0-byte binary message (sent correctly, as one empty frame)."""
    client = await server.connect()
    await within(client.upload("seed", b"s"))  # sets up the file channel
    request_id = client.send({"op": "save", "name": "empty", "size": 0})
    assert await next_reply(client, request_id) == {"op": "ready", "id": request_id}
    client.send_on_file_channel(b"")  # one frame: opcode 2, FIN, length 0
    ack = await next_reply(client, request_id)
    assert ack == {
        "op": "ack",
        "name": "empty",
        "size": 0,
        "sha256": sha256(b""),
        "id": request_id,
    }
    assert (await server.read("empty")) == b""
    assert await server.leftovers() == []
    files = await within(client.list())
    assert [(f["name"], f["size"]) for f in files] == [("empty", 0), ("seed", 1)]
    # the file channel survived: the next transfer uses it
    assert client.file_close_codes == []
    await within(client.upload("after", b"x"))


@pytest_twisted.ensureDeferred
async def test_empty_file_upload_with_the_client(server):
    client = await server.connect()
    ack = await within(client.upload("empty", b""))
    assert ack["size"] == 0
    assert ack["sha256"] == sha256(b"")
    assert (await server.read("empty")) == b""
    assert client.file_close_codes == []
    await within(client.upload("after", b"x"))  # the file channel survived


@pytest_twisted.ensureDeferred
async def test_empty_file_download(server):
    await server.put("empty", b"")
    client = await server.connect()
    sink = io.BytesIO()
    sent = await within(client.download("empty", sink))
    assert sent["size"] == 0
    assert sent["sha256"] == sha256(b"")
    assert sink.getvalue() == b""
    assert client.file_close_codes == []
    assert stray_notices(client) == []


# -- concurrency and ordering -------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_eight_concurrent_clients(server):
    clients = await within(
        defer.gatherResults([defer.ensureDeferred(server.connect()) for _ in range(8)])
    )
    payloads = {f"client-{i}.bin": blob(256 * 1024 + 1000 * i, seed=100 + i) for i in range(8)}

    async def round_trip(client: WsfilesClient, name: str, data: bytes) -> bytes:
        ack = await client.upload(name, data)
        assert ack["sha256"] == sha256(data)
        sink = io.BytesIO()
        sent = await client.download(name, sink)
        assert sent["sha256"] == sha256(data)
        return sink.getvalue()

    results = await within(
        defer.gatherResults(
            [
                defer.ensureDeferred(round_trip(c, name, data))
                for c, (name, data) in zip(clients, payloads.items(), strict=True)
            ],
            consumeErrors=True,
        ),
        30,
    )
    assert results == list(payloads.values())
    assert await server.stored() == payloads
    assert await server.leftovers() == []
    listing = await within(clients[0].list())
    assert [f["name"] for f in listing] == sorted(payloads)


@pytest_twisted.ensureDeferred
async def test_list_is_answered_while_an_upload_is_in_progress(server):
    client = await server.connect()
    observer = await server.connect()
    await within(client.upload("old.txt", b"old"))  # sets up the file channel

    data = blob(4 * MiB, seed=5)
    request_id = client.send({"op": "save", "name": "big.bin", "size": len(data)})
    assert await next_reply(client, request_id) == {"op": "ready", "id": request_id}

    # Send half of the message, and keep it open: the upload is in progress.
    file_channel = client._file
    assert file_channel is not None
    file_channel.beginMessage(isBinary=True)
    half = len(data) // 2
    for start in range(0, half, CHUNK_SIZE):
        file_channel.sendMessageFrame(data[start : min(start + CHUNK_SIZE, half)])

    # Both the uploading client and another one get their listing at once;
    # the half-received file is not in it.
    for who in (client, observer):
        files = await within(who.list())
        assert [f["name"] for f in files] == ["old.txt"]
    if server.backend == "local":  # an object store buffers the first part in memory
        assert len(await server.leftovers()) == 1

    for start in range(half, len(data), CHUNK_SIZE):
        file_channel.sendMessageFrame(data[start : start + CHUNK_SIZE])
    file_channel.endMessage()
    ack = await next_reply(client, request_id)
    assert ack["op"] == "ack"
    assert ack["sha256"] == sha256(data)
    assert (await server.read("big.bin")) == data
    assert await server.leftovers() == []


@pytest_twisted.ensureDeferred
async def test_pipelined_saves_and_get_run_in_order(server):
    existing = blob(300_000, seed=6)
    await server.put("c.bin", existing)
    a, b = blob(200_000, seed=7), blob(150_000, seed=8)

    client = await server.connect()
    log = record(client)
    download = arm_download(client)
    # back to back, before any reply
    save_a = client.send({"op": "save", "name": "a.bin", "size": len(a)})
    save_b = client.send({"op": "save", "name": "b.bin", "size": len(b)})
    get_c = client.send({"op": "get", "name": "c.bin"})

    channel = await next_reply(client, save_a)
    assert channel["op"] == "channel"
    await open_channel(client, channel["url"])
    assert (await next_reply(client, save_a))["op"] == "ready"
    client.send_on_file_channel(a)
    assert (await next_reply(client, save_a))["sha256"] == sha256(a)
    assert (await next_reply(client, save_b))["op"] == "ready"
    client.send_on_file_channel(b)
    assert (await next_reply(client, save_b))["sha256"] == sha256(b)
    assert (await next_reply(client, get_c))["op"] == "sending"
    sent = await next_reply(client, get_c)
    assert sent["sha256"] == sha256(existing)
    await within(download.done)
    assert download.sink.getvalue() == existing

    assert [(m["op"], m["id"]) for m in log] == [
        ("channel", save_a),
        ("ready", save_a),
        ("ack", save_a),
        ("ready", save_b),
        ("ack", save_b),
        ("sending", get_c),
        ("sent", get_c),
    ]
    assert await server.stored() == {"a.bin": a, "b.bin": b, "c.bin": existing}


# -- subprotocol --------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_subprotocol_is_selected_when_offered(server):
    client = await server.connect()  # the client offers wsfiles.v1 on both channels
    assert client._command is not None
    assert client._command.websocket_protocol_in_use == SUBPROTOCOL == "wsfiles.v1"
    await within(client.upload("f", b"data"))
    assert client._file is not None
    assert client._file.websocket_protocol_in_use == "wsfiles.v1"


# -- an independent client ----------------------------------------------------


def _websockets_session(base_url: str, data: bytes) -> dict[str, Any]:
    """hello, save and get with the ``websockets`` library (runs in a thread)."""
    from websockets.asyncio.client import connect as ws_connect

    async def recv_json(ws: Any) -> dict[str, Any]:
        while True:
            message = await ws.recv()
            assert isinstance(message, str), message
            decoded = json.loads(message)
            if decoded.get("op") not in UNSOLICITED:
                return decoded

    async def session() -> dict[str, Any]:
        out: dict[str, Any] = {}
        async with ws_connect(
            base_url + "/command", subprotocols=["wsfiles.v1"], proxy=None, max_size=None
        ) as command:
            out["command_subprotocol"] = command.subprotocol
            out["hello"] = await recv_json(command)
            await command.send(
                json.dumps({"op": "save", "name": "ws.bin", "size": len(data), "id": "s1"})
            )
            out["channel"] = await recv_json(command)
            # no subprotocol offered here: none may be selected
            async with ws_connect(
                base_url + out["channel"]["url"], proxy=None, max_size=None
            ) as file_channel:
                out["file_subprotocol"] = file_channel.subprotocol
                out["ready"] = await recv_json(command)
                await file_channel.send(data)  # one frame, larger than the server's chunks
                out["ack"] = await recv_json(command)
                await command.send(json.dumps({"op": "get", "name": "ws.bin", "id": 2}))
                out["sending"] = await recv_json(command)
                out["downloaded"] = await file_channel.recv()
                out["sent"] = await recv_json(command)
                await command.send(json.dumps({"op": "list", "id": 3}))
                out["list"] = await recv_json(command)
        return out

    async def bounded() -> dict[str, Any]:
        return await asyncio.wait_for(session(), 20)

    return asyncio.run(bounded())


@pytest_twisted.ensureDeferred
async def test_conformance_with_the_websockets_library(server):
    await server.put("existing", b"abc")
    data = blob(700_000, seed=11)
    out = await within(threads.deferToThread(_websockets_session, server.url, data), 30)

    assert out["command_subprotocol"] == "wsfiles.v1"
    assert out["file_subprotocol"] is None
    hello = out["hello"]
    assert hello["op"] == "hello"
    assert hello["protocol"] == 1
    assert [f["name"] for f in hello["files"]] == ["existing"]
    assert out["channel"]["op"] == "channel"
    assert out["channel"]["id"] == "s1"
    assert out["channel"]["url"].startswith("/file?ticket=")
    assert out["ready"] == {"op": "ready", "id": "s1"}
    assert out["ack"] == {
        "op": "ack",
        "name": "ws.bin",
        "size": len(data),
        "sha256": sha256(data),
        "id": "s1",
    }
    assert out["sending"] == {"op": "sending", "name": "ws.bin", "size": len(data), "id": 2}
    assert out["downloaded"] == data
    assert out["sent"]["sha256"] == sha256(data)
    assert out["sent"]["id"] == 2
    assert [f["name"] for f in out["list"]["files"]] == ["existing", "ws.bin"]
    assert (await server.read("ws.bin")) == data
    assert await server.leftovers() == []


@pytest_twisted.ensureDeferred
async def test_a_folder_whose_list_is_larger_than_a_command_is_still_listed(server):
    names = [f"a-rather-long-file-name-to-make-a-big-listing-{i:05}.txt" for i in range(2000)]
    for name in names:
        await server.put(name, b"x")
    client = await server.connect()
    assert [f["name"] for f in client.hello["files"]] == names
    assert [f["name"] for f in await client.list()] == names
    await client.delete(names[0])
    changed = await client.changes.get().addTimeout(10, reactor)
    assert [f["name"] for f in changed] == names[1:]
