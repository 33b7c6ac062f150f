"""BLAKE3 as a negotiated hash (docs/protocol.md, "Faster hashing"): ``hello``
lists the hashes, ``save``/``get`` name one, ``ack``/``sent`` carry it, and a
file uploaded with BLAKE3 still shows its SHA-256 wherever one is exposed."""

from __future__ import annotations

import contextlib
import io
import os
from typing import Any

import blake3
import pytest
import pytest_twisted
from conftest import BIN, run_process
from e2e_helpers import blob, sha256, within
from test_downloads import fetch
from test_protocol_11 import cut_file_channel, raw_get, resume_offset, start_resumable
from test_shares import ask, connect12

from wsfiles.client import WsfilesError
from wsfiles.storage.local import LocalFolder

SHA_XATTR, B3_XATTR = "user.wsfiles.sha256", "user.wsfiles.blake3"


def b3(data: bytes) -> str:
    return blake3.blake3(data).hexdigest()


def recorded(path: Any) -> dict[str, str]:
    """The digests a local file has recorded, by hash name (the hex part)."""
    found = {}
    for name, attr in (("sha256", SHA_XATTR), ("blake3", B3_XATTR)):
        with contextlib.suppress(OSError):
            found[name] = os.getxattr(path, attr).decode().split()[0]
    return found


async def code_of(client: Any, message: dict[str, Any]) -> str:
    reply = await within(client.reply(client.send(message)))
    return reply.get("code", reply["op"])


@pytest_twisted.ensureDeferred
async def test_a_blake3_save_is_acked_with_its_blake3_and_declared_digests_are_checked(server):
    data = blob(300_000, seed=1)
    client = await server.connect()
    assert client.hello["hashes"] == ["sha256", "blake3"]
    ack = await client.upload("f", data, hash="blake3", checksum=True)  # declares blake3
    assert ack["blake3"] == b3(data) and "sha256" not in ack
    # Its own digest is recorded; the SHA-256 is not computed at all.
    assert recorded(server.root / "f") == {"blake3": b3(data)}
    assert await server.read("f") == data

    save = {"op": "save", "name": "f", "size": 5, "hash": "blake3"}
    request_id = client.send({**save, "blake3": b3(b"other")})
    assert (await client.reply(request_id))["op"] == "ready"
    client.send_on_file_channel(b"wrong")
    error = await client.reply(request_id)
    assert error["code"] == "checksum_mismatch" and "BLAKE3" in error["message"]
    assert await server.read("f") == data and await server.leftovers() == []

    for bad in (
        {**save, "hash": "md5"},
        {**save, "hash": ["blake3"]},
        {**save, "blake3": "xyz"},
        {**save, "sha256": sha256(b"wrong")},  # a digest the server would not compute
        {"op": "save", "name": "g", "size": 1, "blake3": b3(b"g")},  # without "hash"
        {"op": "get", "name": "f", "hash": "sha1"},
    ):
        assert await code_of(client, bad) == "bad_request", bad


@pytest_twisted.ensureDeferred
async def test_a_file_uploaded_with_blake3_shows_its_sha256_wherever_one_is_exposed(server):
    data = blob(400_000, seed=2)
    client = await connect12(server)
    await client.upload("a/f.bin", data, hash="blake3")
    path = server.root / "a" / "f.bin"
    # A download ticket asked before any SHA-256 exists: a weak ETag...
    ticket = await ask(client, op="download", name="a/f.bin")
    assert ticket["etag"].startswith('W/"') and "sha256" not in ticket

    # ...a get with hash blake3 sends the recorded BLAKE3, and pieces their own.
    sink = io.BytesIO()
    sent = await client.download("a/f.bin", sink, hash="blake3")  # checked by the client
    assert sent["blake3"] == b3(data) and "sha256" not in sent and sink.getvalue() == data
    replies, piece = await raw_get(
        client, {"op": "get", "name": "a/f.bin", "offset": 10, "length": 100, "hash": "blake3"}
    )
    assert piece == data[10:110] and replies[-1]["range_blake3"] == b3(piece)
    assert recorded(path) == {"blake3": b3(data)}

    # A sync client's listing computes the SHA-256 then, and records it.
    listing = await ask(client, op="list", path="a", sha256=True)
    assert [(f["name"], f["sha256"]) for f in listing["files"]] == [("f.bin", sha256(data))]
    assert recorded(path) == {"blake3": b3(data), "sha256": sha256(data)}

    # The ticket taken under the weak ETag still serves the file; new ones are strong.
    status, headers, body = await fetch(server, ticket["url"])
    assert (status, body) == (200, data)
    fresh = await ask(client, op="download", name="a/f.bin")
    assert (fresh["etag"], fresh["sha256"]) == (f'"{sha256(data)}"', sha256(data))
    status, headers, body = await fetch(server, fresh["url"])
    assert (status, headers["etag"], body) == (200, f'"{sha256(data)}"', data)


@pytest_twisted.ensureDeferred
async def test_a_plain_get_of_a_blake3_upload_hashes_sha256_once_and_records_it(server):
    data = blob(200_000, seed=3)
    client = await server.connect()
    await client.upload("f", data, hash="blake3")
    sent = await client.download("f", io.BytesIO())  # the client checks the SHA-256
    assert sent["sha256"] == sha256(data) and "blake3" not in sent
    assert recorded(server.root / "f") == {"blake3": b3(data), "sha256": sha256(data)}


@pytest_twisted.ensureDeferred
async def test_a_resumed_blake3_upload_rehashes_the_kept_bytes_and_another_hash_starts_over(
    server,
):
    data = os.urandom(1_000_000)
    client = await server.connect()
    first = await start_resumable(client, "f", data, 400_000, hash="blake3")
    await cut_file_channel(server, client)
    assert (await client.reply(first))["code"] == "channel_closed"
    # The same upload with SHA-256 does not continue a BLAKE3 partial...
    _, offset = await resume_offset(client, "f", len(data))
    assert offset == 0
    await cut_file_channel(server, client)
    first = await start_resumable(client, "f", data, 400_000, hash="blake3")
    await cut_file_channel(server, client)
    await client.reply(first)
    # ...the same hash does, and the ack covers the whole file.
    request_id, offset = await resume_offset(client, "f", len(data), hash="blake3")
    assert offset == 400_000
    client.send_on_file_channel(data[offset:])
    ack = await client.reply(request_id)
    assert ack["op"] == "ack" and ack["blake3"] == b3(data)
    assert await server.read("f") == data


async def wsfiles(*args: str) -> tuple[int, str, str]:
    return await run_process([str(BIN / "wsfiles"), *args])


@pytest.mark.parametrize("offered", [("sha256", "blake3"), ("sha256",)])
@pytest_twisted.ensureDeferred
async def test_the_cli_uses_blake3_where_the_server_offers_it(
    server, tmp_path, monkeypatch, offered
):
    # ("sha256",): a server whose storage takes SHA-256 only (an older one, or S3).
    monkeypatch.setattr(LocalFolder, "accepted_hashes", offered)
    data = blob(150_000, seed=4)
    (tmp_path / "up.bin").write_bytes(data)
    assert (await wsfiles("put", "-q", server.url, str(tmp_path / "up.bin")))[0] == 0
    digest = {"blake3": b3(data)} if "blake3" in offered else {"sha256": sha256(data)}
    assert recorded(server.root / "up.bin") == digest
    code, _, err = await wsfiles(
        "get", "-q", "-o", str(tmp_path / "down.bin"), server.url, "up.bin"
    )
    assert (code, err) == (0, "")
    assert (tmp_path / "down.bin").read_bytes() == data
    # The get asked for the hash recorded: no other was computed.
    assert recorded(server.root / "up.bin") == digest


@pytest_twisted.ensureDeferred
async def test_a_server_without_blake3_refuses_it(server, monkeypatch):
    monkeypatch.setattr(LocalFolder, "accepted_hashes", ("sha256",))
    client = await server.connect()
    assert client.hello["hashes"] == ["sha256"]
    with pytest.raises(WsfilesError) as error:
        await client.upload("f", b"x", hash="blake3")
    assert error.value.code == "bad_request" and not await server.exists("f")
