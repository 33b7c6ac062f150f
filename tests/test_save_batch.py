"""``save_batch`` (docs/protocol.md, "Many small files: save_batch"): many
files in one command and one message, each stored on its own with its own
outcome.  Real server, real sockets, every backend."""

from __future__ import annotations

import hashlib
import os
from typing import Any

import pytest
import pytest_twisted
from e2e_helpers import local_only, within

from wsfiles.batch import MAX_BATCH_FILE, MAX_BATCH_FILES
from wsfiles.client import COMMAND_SUBPROTOCOLS, BatchFile, WsfilesError, connect
from wsfiles.client_tree import list_folder

pytestmark = pytest.mark.every_backend


async def connect_12(srv: Any) -> Any:
    client = await within(connect(srv.url, subprotocols=COMMAND_SUBPROTOCOLS))
    srv.clients.append(client)
    return client


@pytest_twisted.ensureDeferred
async def test_a_batch_stores_every_file_with_its_digest_and_mtime(server_factory):
    srv = await server_factory()
    client = await connect_12(srv)
    files = [BatchFile(f"many/{i:03}.bin", os.urandom(i * 37)) for i in range(120)]
    files.append(BatchFile("deep/er/dated.txt", b"old", mtime=1000000000.0))
    outcomes = await within(client.save_batch(files))
    assert [o["name"] for o in outcomes] == [f.name for f in files]
    for file, outcome in zip(files, outcomes, strict=True):
        assert outcome["sha256"] == hashlib.sha256(file.data).hexdigest()
        assert await srv.read(file.name) == file.data
    listed = await within(list_folder(client, "deep/er", sha256=True))
    assert listed[0]["mtime"] == pytest.approx(1000000000.0)
    assert await srv.leftovers() == []


@pytest_twisted.ensureDeferred
async def test_one_refused_file_does_not_undo_the_others(server_factory):
    srv = await server_factory()
    await srv.put("kept.txt", b"theirs")
    await srv.storage.folder(None).mkdir("a-folder", False)
    client = await connect_12(srv)
    outcomes = await within(
        client.save_batch(
            [
                BatchFile("first.txt", b"1"),
                BatchFile("kept.txt", b"mine", if_absent=True),
                BatchFile("a-folder", b"onto a folder"),
                BatchFile("kept.txt/below", b"under a file"),
                BatchFile("last.txt", b"3", sha256="0" * 64),
                BatchFile("after.txt", b"4"),
            ]
        )
    )
    codes = [o.get("error") for o in outcomes]
    assert codes == [None, "conflict", "is_a_folder", "not_a_folder", "checksum_mismatch", None]
    assert await srv.read("kept.txt") == b"theirs"
    assert await srv.read("first.txt") == b"1" and await srv.read("after.txt") == b"4"
    assert await srv.read("last.txt") is None
    assert await srv.leftovers() == []


@pytest_twisted.ensureDeferred
async def test_a_bad_batch_is_refused_before_any_data(server_factory):
    srv = await server_factory()
    client = await connect_12(srv)

    async def code(files: Any) -> str:
        with pytest.raises(WsfilesError) as error:
            await within(client.request({"op": "save_batch", "files": files}))
        return error.value.code

    assert await code([]) == "bad_request"
    assert await code("x") == "bad_request"
    assert await code([1]) == "bad_request"
    assert await code([{"name": "a", "size": 1, "if_absent": "yes"}]) == "bad_request"
    assert await code([{"name": "a", "size": 1}] * (MAX_BATCH_FILES + 1)) == "bad_request"
    assert await code([{"name": "a", "size": 1}, {"name": "a", "size": 2}]) == "bad_request"
    assert await code([{"name": "../x", "size": 1}]) == "invalid_name"
    assert await code([{"name": "big", "size": MAX_BATCH_FILE + 1}]) == "too_large"
    assert await code([{"name": "m", "size": 1, "mtime": -5}]) == "bad_request"
    assert await srv.stored() == {}


@pytest_twisted.ensureDeferred
async def test_a_batch_message_of_the_wrong_length_stores_nothing_after_the_gap(server_factory):
    srv = await server_factory()
    client = await connect_12(srv)
    request_id = client.send(
        {"op": "save_batch", "files": [{"name": "a", "size": 3}, {"name": "b", "size": 3}]}
    )
    while (reply := await within(client.reply(request_id)))["op"] == "channel":
        await within(client._open_file_channel(reply["url"]))
    assert reply["op"] == "ready"
    client.send_on_file_channel(b"abcd")  # a's 3 bytes, then 1 of b's 3: short
    reply = await within(client.reply(request_id))
    assert reply["code"] == "size_mismatch"
    # "a" was complete before the cut: stored on its own, unless the cut came
    # first (on S3 its store is still looking at the folder); the reply says.
    stored = int(reply["message"].rsplit("; ", 1)[1].split()[0])
    assert await srv.stored() == ({"a": b"abc"} if stored else {})
    assert await srv.read("b") is None  # the file cut short is never stored
    assert await srv.leftovers() == []


@pytest_twisted.ensureDeferred
async def test_a_batch_refused_before_its_data_sends_no_changed_event(server_factory):
    srv = await server_factory(quota=10_000)
    await srv.put("sub/old.txt", b"x")
    client, watcher = await connect_12(srv), await connect_12(srv)
    over = [BatchFile(f"sub/{i}", b"z" * 4000) for i in range(3)]
    with pytest.raises(WsfilesError, match="quota"):
        await within(client.save_batch(over))
    await within(client.request({"op": "mkdir", "path": "marker"}))
    # Events go out in the order of the changes (each after the same short
    # coalescing delay): a "sub" event for the refused batch would come first.
    event = await within(watcher.folder_changes.get())
    assert event["path"] == "" and "marker" in {e["name"] for e in event["files"]}, event


@pytest_twisted.ensureDeferred
async def test_a_batch_past_the_file_count_or_listing_limit_stores_nothing(server_factory):
    srv = await server_factory(quota_files=4, max_listing=800, quota=10_000)
    await srv.put("old.txt", b"x")
    client = await connect_12(srv)

    async def code(files: list[BatchFile]) -> str:
        with pytest.raises(WsfilesError) as error:
            await within(client.save_batch(files))
        return error.value.code

    # 1 file + a new folder + 3 new files = 5 entries, over 4.
    too_many = [BatchFile(f"new/{i}", b"") for i in range(3)]
    assert await code(too_many) == "quota_exceeded"
    # Long names: the top folder's listing would pass 800 bytes.
    long_names = [BatchFile(f"{i}" + "n" * 239, b"") for i in range(3)]
    assert await code(long_names) == "quota_exceeded"
    # Bytes: over the 10,000-byte quota together, though each file fits.
    assert await code([BatchFile(f"b{i}", b"z" * 4000) for i in range(3)]) == "quota_exceeded"
    assert await srv.stored() == {"old.txt": b"x"}
    assert await srv.storage.folder(None).kind("new") is None
    # Replacing the existing file and adding two is within every limit.
    fits = [BatchFile("old.txt", b"y"), BatchFile("new/a", b"1")]
    assert [o.get("error") for o in await within(client.save_batch(fits))] == [None, None]
    assert await srv.read("old.txt") == b"y" and await srv.read("new/a") == b"1"


@pytest_twisted.ensureDeferred
async def test_wsfiles_sync_sends_many_long_named_files_in_batches_that_fit(
    server_factory, tmp_path
):
    """300 names of 200 characters make a ~80 KiB command: over the server's
    64 KiB limit, which closes the channel.  The sync splits its batches."""
    from conftest import BIN, run_process

    srv = await server_factory()
    local_only(srv, "the sync client does not depend on the storage")
    local = tmp_path / "local"
    (local / "long").mkdir(parents=True)
    old = 1_000_000_000
    for i in range(300):
        path = local / "long" / (f"{i:03}" + "n" * 197)
        path.write_bytes(b"%d" % i)
        os.utime(path, (old, old))  # long past the sync's quiet time
    status, _, err = await within(
        run_process([str(BIN / "wsfiles"), "sync", str(local), srv.url, "--once"]), 60
    )
    assert status == 0, err
    listed = await within(list_folder(await connect_12(srv), "long", sha256=True))
    assert len(listed) == 300
    assert all(entry["mtime"] == old for entry in listed)
