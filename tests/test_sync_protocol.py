"""What protocol 1.2 gives sync clients (docs/protocol.md, "For sync clients"):
``list`` with each file's SHA-256, ``save`` setting the mtime, saves and
deletes that happen only if the stored file is still the one expected, and
transfers that the command rate limit does not throttle.  Real server, real
sockets, every backend.
"""

from __future__ import annotations

import hashlib
import io
import os
from typing import Any

import pytest
import pytest_twisted
from e2e_helpers import local_only, within

from wsfiles.client import COMMAND_SUBPROTOCOLS, WsfilesError, connect
from wsfiles.client_tree import list_folder
from wsfiles.storage import Precondition, PreconditionFailed

pytestmark = pytest.mark.every_backend


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def connect_12(srv: Any) -> Any:
    client = await within(connect(srv.url, subprotocols=COMMAND_SUBPROTOCOLS))
    srv.clients.append(client)
    return client


async def refused(work: Any) -> str:
    with pytest.raises(WsfilesError) as error:
        await within(work)
    return error.value.code


@pytest_twisted.ensureDeferred
async def test_a_listing_with_sha256_gives_every_files_digest(server_factory):
    srv = await server_factory()
    await srv.put("top.txt", b"top")
    await srv.put("a/b/deep.bin", b"deep" * 1000)
    client = await connect_12(srv)
    entries = await within(list_folder(client, recursive=True, sha256=True))
    files = {e["name"]: e for e in entries if e["type"] == "file"}
    assert files["top.txt"]["sha256"] == sha(b"top")
    assert files["a/b/deep.bin"]["sha256"] == sha(b"deep" * 1000)
    assert files["a/b/deep.bin"]["size"] == 4000
    assert all("sha256" not in e for e in entries if e["type"] == "folder")
    # Listing a subfolder names its files relative to it, digests included.
    below = await within(list_folder(client, "a", recursive=True, sha256=True))
    assert {e["name"]: e.get("sha256") for e in below} == {
        "b": None,
        "b/deep.bin": sha(b"deep" * 1000),
    }
    with pytest.raises(WsfilesError) as refused:
        await within(client.request({"op": "list", "sha256": "yes"}))
    assert refused.value.code == "bad_request"
    # Without the flag, nothing changes: no digests.
    plain = await within(list_folder(client, recursive=True))
    assert all("sha256" not in e for e in plain)


@pytest_twisted.ensureDeferred
async def test_a_listing_hashes_files_other_programs_wrote_or_changed(server_factory):
    srv = await server_factory()
    local_only(srv, "other programs write into the folder")
    await srv.put("kept.txt", b"first")
    (srv.folder() / "kept.txt").write_bytes(b"changed by another program")
    (srv.folder() / "dropped-in.txt").write_bytes(b"never saved through wsfiles")
    client = await connect_12(srv)
    entries = {e["name"]: e for e in await within(list_folder(client, sha256=True))}
    assert entries["kept.txt"]["sha256"] == sha(b"changed by another program")
    assert entries["dropped-in.txt"]["sha256"] == sha(b"never saved through wsfiles")


@pytest_twisted.ensureDeferred
async def test_save_sets_the_mtime_and_a_bad_mtime_is_refused(server_factory):
    srv = await server_factory()
    client = await connect_12(srv)
    ack = await within(client.upload("dated/old.txt", b"from 2001", mtime=1000000000.25))
    assert ack["mtime"] == 1000000000.25
    [entry] = [e for e in await within(list_folder(client, "dated", sha256=True))]
    assert entry["mtime"] == pytest.approx(1000000000.25, abs=1e-6)
    assert entry["sha256"] == sha(b"from 2001")
    if srv.backend == "local":
        assert os.stat(srv.folder() / "dated" / "old.txt").st_mtime_ns == 1000000000250000000
    for bad in (-1, "yesterday", True, 1e12):
        code = await refused(client.request({"op": "save", "name": "x", "size": 1, "mtime": bad}))
        assert code == "bad_request"
    assert not await srv.exists("x")


@pytest_twisted.ensureDeferred
async def test_conditional_saves_and_deletes_never_overwrite_another_change(server_factory):
    srv = await server_factory()
    await srv.put("doc.txt", b"version 1")
    client = await connect_12(srv)
    # Someone changed doc.txt since we saw version 0: refused, nothing changed.
    code = await refused(client.upload("doc.txt", b"mine", if_sha256=sha(b"version 0")))
    assert code == "conflict"
    code = await refused(client.upload("doc.txt", b"mine", if_absent=True))
    assert code == "conflict"
    code = await refused(client.delete("doc.txt", if_sha256=sha(b"version 0")))
    assert code == "conflict"
    assert await srv.read("doc.txt") == b"version 1"
    # The expected file is there: the save replaces it, the delete removes it.
    await within(client.upload("doc.txt", b"version 2", if_sha256=sha(b"version 1")))
    assert await srv.read("doc.txt") == b"version 2"
    await within(client.upload("new.txt", b"fresh", if_absent=True))
    assert await srv.read("new.txt") == b"fresh"
    await within(client.delete("doc.txt", if_sha256=sha(b"version 2")))
    assert await srv.read("doc.txt") is None
    # Nonsense combinations are refused before anything happens.
    both = {"op": "save", "name": "n", "size": 0, "if_absent": True, "if_sha256": sha(b"")}
    assert await refused(client.request(both)) == "bad_request"
    assert await refused(client.request({**both, "if_sha256": "xyz"})) == "bad_request"
    delete = {"op": "delete", "name": "new.txt", "if_absent": True}
    assert await refused(client.request(delete)) == "bad_request"
    assert await srv.read("new.txt") == b"fresh"
    assert await srv.leftovers() == []


@pytest_twisted.ensureDeferred
async def test_a_change_between_the_check_and_the_commit_is_caught(server_factory):
    """The precondition is checked again just before the new file appears."""
    srv = await server_factory()
    await srv.put("race.txt", b"old")
    folder = srv.storage.folder(None)
    upload = await folder.begin_upload("race.txt", 4, precondition=Precondition(sha256=sha(b"old")))
    pending = upload.write(b"mine")
    if pending is not None:
        await pending
    await srv.put("race.txt", b"theirs")  # another client's save lands first
    with pytest.raises(PreconditionFailed):
        await within(upload.commit())
    assert await srv.read("race.txt") == b"theirs"
    absent = await folder.begin_upload("late.txt", 4, precondition=Precondition(absent=True))
    pending = absent.write(b"mine")
    if pending is not None:
        await pending
    await srv.put("late.txt", b"first")
    with pytest.raises(PreconditionFailed):
        await within(absent.commit())
    assert await srv.read("late.txt") == b"first"
    assert await srv.leftovers() == []


@pytest_twisted.ensureDeferred
async def test_saves_in_quick_succession_are_not_throttled_by_the_command_rate(server_factory):
    srv = await server_factory(rate_limit=5)
    local_only(srv, "the rate limit does not depend on the storage")
    client = await connect_12(srv)
    # 40 saves as fast as they complete, far past 5 commands a second: all stored.
    for i in range(40):
        await within(client.upload(f"many/{i:02}.txt", io.BytesIO(b"x")))
    assert len(await within(list_folder(client, "many"))) == 40
    # Other commands are still limited.
    replies = [
        await within(client.reply(i)) for i in [client.send({"op": "list"}) for _ in range(30)]
    ]
    assert "rate_limited" in [reply.get("code") for reply in replies]
