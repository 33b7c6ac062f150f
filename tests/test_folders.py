"""Protocol 1.2 folders over the network: a real server, real sockets.

The contract is docs/protocol.md, "Folders".  The same commands on a channel
that did not offer ``wsfiles.v1.2`` behave as in 1.1 (tested at the end).
"""

from __future__ import annotations

import io
import json
import os
from typing import Any

import pytest
import pytest_twisted
from e2e_helpers import local_only, within

from wsfiles.client import COMMAND_SUBPROTOCOLS, WsfilesError, connect

pytestmark = pytest.mark.every_backend


async def kind(srv: Any, path: str) -> str | None:
    """What the server's storage holds at ``path``: "file", "folder" or None."""
    return await srv.storage.folder(None).kind(path)


async def connect_12(srv: Any) -> Any:
    client = await within(connect(srv.url, subprotocols=COMMAND_SUBPROTOCOLS))
    assert client.hello["protocol"] == "1.2"
    assert "folders" in client.hello["features"]
    return client


async def ask(client: Any, **command: Any) -> dict[str, Any]:
    return await within(client.request(command))


async def refused(client: Any, **command: Any) -> str:
    with pytest.raises(WsfilesError) as error:
        await within(client.request(command))
    return error.value.code


def names(reply: dict[str, Any]) -> list[str]:
    return [entry["name"] for entry in reply["files"]]


@pytest_twisted.async_yield_fixture
async def client12(server_factory):
    srv = await server_factory()
    client = await connect_12(srv)
    client.srv = srv
    yield client
    await client.close()


@pytest_twisted.ensureDeferred
async def test_hello_announces_1_2_and_lists_the_top_with_folders(server_factory):
    srv = await server_factory()
    await srv.storage.folder(None).mkdir("docs", False)
    await srv.put("notes.txt", b"hello")
    client = await connect_12(srv)
    try:
        hello = client.hello
        assert hello["max_path"] == 1024 and hello["max_depth"] == 32
        assert hello["max_list"] == 1000
        docs, notes = hello["files"]
        assert docs["name"] == "docs" and docs["type"] == "folder" and "size" not in docs
        assert notes["name"] == "notes.txt" and notes["type"] == "file" and notes["size"] == 5
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_save_creates_parents_and_get_reads_a_nested_path(client12):
    data = os.urandom(3000)
    await within(client12.upload("a/b/c.bin", data))
    assert await client12.srv.read("a/b/c.bin") == data
    sink = io.BytesIO()
    await within(client12.download("a/b/c.bin", sink))
    assert sink.getvalue() == data
    assert names(await ask(client12, op="list", path="a")) == ["b"]
    assert names(await ask(client12, op="list", path="a/b")) == ["c.bin"]
    top = await ask(client12, op="list")
    assert top["files"][0]["type"] == "folder" and top["path"] == ""


@pytest_twisted.ensureDeferred
async def test_mkdir_rmdir_and_their_refusals(client12):
    created = await ask(client12, op="mkdir", path="p/q", parents=True)
    assert created["op"] == "created" and created["path"] == "p/q"
    assert await kind(client12.srv, "p/q") == "folder"
    assert await refused(client12, op="mkdir", path="x/y") == "not_found"  # no parents
    assert await refused(client12, op="mkdir", path="p") == "exists"
    await ask(client12, op="mkdir", path="p", parents=True)  # mkdir -p of a folder: fine
    await within(client12.upload("p/file.txt", b"1"))
    assert await refused(client12, op="mkdir", path="p/file.txt", parents=True) == "exists"
    assert await refused(client12, op="rmdir", path="p") == "not_empty"
    assert await refused(client12, op="rmdir", path="p/file.txt") == "not_a_folder"
    assert await refused(client12, op="rmdir", path="nothing") == "not_found"
    await ask(client12, op="rmdir", path="p/q")
    removed = await ask(client12, op="rmdir", path="p", recursive=True)
    assert removed["op"] == "removed" and removed["path"] == "p"
    assert await kind(client12.srv, "p") is None


@pytest_twisted.ensureDeferred
async def test_files_and_folders_refuse_to_be_each_other(client12):
    await within(client12.upload("f.txt", b"x"))
    await ask(client12, op="mkdir", path="d")
    assert await refused(client12, op="get", name="d") == "is_a_folder"
    assert await refused(client12, op="delete", name="d") == "is_a_folder"
    assert await refused(client12, op="save", name="d", size=1) == "is_a_folder"
    assert await refused(client12, op="save", name="f.txt/inner", size=1) == "not_a_folder"
    with pytest.raises(WsfilesError) as error:
        await within(client12.request({"op": "get", "name": "f.txt/x/y"}))
    assert "'f.txt'" in error.value.message or "f.txt" in error.value.message
    assert await refused(client12, op="list", path="f.txt") == "not_a_folder"
    assert await refused(client12, op="list", path="none") == "not_found"
    assert await refused(client12, op="get", name="none/x") == "not_found"
    assert await client12.srv.read("f.txt") == b"x"  # nothing altered


@pytest_twisted.ensureDeferred
async def test_rename_moves_files_and_folders_across_folders(client12):
    await within(client12.upload("a/one.txt", b"1"))
    await within(client12.upload("b/two.txt", b"2"))
    await ask(client12, op="rename", name="a/one.txt", to="c/d/one.txt")  # parents made
    assert await client12.srv.read("c/d/one.txt") == b"1"
    await ask(client12, op="rename", name="b", to="c/b")  # a folder, whole
    assert await client12.srv.read("c/b/two.txt") == b"2"
    assert await refused(client12, op="rename", name="c", to="c/d/c") == "invalid_move"
    await ask(client12, op="rename", name="c", to="c")  # onto itself: nothing to do, as in 1.1
    assert await client12.srv.read("c/b/two.txt") == b"2"
    await ask(client12, op="mkdir", path="e")
    # A folder replaces nothing, and nothing replaces a folder, overwrite or not.
    code = await refused(client12, op="rename", name="c/b", to="e", overwrite=True)
    assert code == "exists"
    with pytest.raises(WsfilesError) as error:
        await within(client12.request({"op": "rename", "name": "c/b", "to": "e"}))
    assert "never replaces" in error.value.message  # not "send overwrite", which cannot help
    await within(client12.upload("g.txt", b"g"))
    assert await refused(client12, op="rename", name="g.txt", to="e", overwrite=True) == "exists"
    assert await refused(client12, op="rename", name="e", to="g.txt", overwrite=True) == "exists"
    assert await client12.srv.read("g.txt") == b"g"


@pytest_twisted.ensureDeferred
async def test_a_big_folder_pages_and_a_recursive_listing_walks_the_tree(client12):
    local_only(
        client12.srv, "2,500 files are made directly on disk (S3 paging: test_storage_folders)"
    )
    root = client12.srv.root
    (root / "big").mkdir(parents=True)
    for n in range(2500):
        (root / "big" / f"f{n:05d}").write_bytes(b"")
    first = await ask(client12, op="list", path="big")  # no limit: max_list
    assert len(first["files"]) == 1000 and first["cursor"] == "f00999"
    seen = names(first)
    cursor = first["cursor"]
    for _ in range(5):  # bounded
        page = await ask(client12, op="list", path="big", limit=700, cursor=cursor)
        seen += names(page)
        cursor = page.get("cursor")
        if cursor is None:
            break
    assert seen == [f"f{n:05d}" for n in range(2500)]
    # Recursive: depth first, each folder before its contents, siblings sorted.
    for path in ["t/a/x", "t/a-c", "t/a/b/y", "t/z"]:
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(b"")
    tree = await ask(client12, op="list", path="t", recursive=True)
    assert names(tree) == ["a", "a/b", "a/b/y", "a/x", "a-c", "z"]
    paged, cursor = [], None
    for _ in range(10):
        page = await ask(
            client12,
            op="list",
            path="t",
            recursive=True,
            limit=2,
            **({"cursor": cursor} if cursor else {}),
        )
        paged += names(page)
        cursor = page.get("cursor")
        if cursor is None:
            break
    assert paged == names(tree)


@pytest.mark.parametrize(
    "path",
    [
        "../etc",
        "/abs",
        "a//b",
        "a/",
        "a/./b",
        "a/../b",
        "a\\b",
        "a/b\x00",
        "a/\x1bx",
        "a/.wsfiles-tmp/x",
        "/".join(["d"] * 33),
        "a/" + "n" * 1100,
    ],
)
@pytest_twisted.ensureDeferred
async def test_path_tricks_are_invalid_name_in_every_op(client12, path):
    for command in (
        {"op": "get", "name": path},
        {"op": "save", "name": path, "size": 1},
        {"op": "delete", "name": path},
        {"op": "rename", "name": path, "to": "ok"},
        {"op": "rename", "name": "ok", "to": path},
        {"op": "mkdir", "path": path},
        {"op": "rmdir", "path": path},
        {"op": "list", "path": path},
    ):
        assert await refused(client12, **command) == "invalid_name", command
    assert await client12.srv.storage.folder(None).usage() == (0, 0)  # nothing made


@pytest_twisted.ensureDeferred
async def test_symlinks_and_special_files_are_never_listed_or_followed(client12, tmp_path):
    local_only(client12.srv, "symlinks and named pipes exist on local folders only")
    root = client12.srv.root
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"s")
    (root / "real").mkdir(parents=True)
    os.symlink(outside, root / "link")
    os.symlink(outside, root / "real" / "inner-link")
    os.mkfifo(root / "real" / "pipe")
    assert names(await ask(client12, op="list", recursive=True)) == ["real"]
    assert await refused(client12, op="get", name="link/secret") == "not_found"
    assert await refused(client12, op="list", path="link") == "not_found"
    assert await refused(client12, op="save", name="link/new", size=1) == "not_found"
    assert await refused(client12, op="get", name="real/pipe") == "not_found"
    await ask(client12, op="rmdir", path="real", recursive=True)
    assert (outside / "secret").read_bytes() == b"s"  # the link's target is untouched


@pytest_twisted.ensureDeferred
async def test_changed_events_name_the_folder_and_carry_its_entries(server_factory):
    srv = await server_factory()
    watcher = await connect_12(srv)
    old = await within(connect(srv.url))  # a 1.1 channel of the same client
    maker = await connect_12(srv)
    try:
        await within(maker.upload("photos/2026/a.jpg", b"jpg"))
        event = await within(watcher.folder_changes.get())
        assert event["path"] == "photos/2026"
        assert [e["name"] for e in event["files"]] == ["a.jpg"]
        await within(maker.upload("top.txt", b"t"))
        for _ in range(5):  # 1.1: only the top (its files only), bounded
            files = await within(old.changes.get())
            if files:  # "photos" appearing at the top was an event with no file
                break
        assert [f["name"] for f in files] == ["top.txt"] and "type" not in files[0]
    finally:
        for c in (watcher, old, maker):
            await c.close()


@pytest_twisted.ensureDeferred
async def test_a_1_1_channel_sees_no_folders_and_has_no_folder_ops(server_factory):
    srv = await server_factory()
    await srv.put("docs/inner.txt", b"i")
    await srv.put("top.txt", b"t")
    client = await within(connect(srv.url))
    try:
        assert client.hello["protocol"] == 1 and "folders" not in client.hello["features"]
        assert client.hello["files"] == [json.loads(json.dumps(client.hello["files"][0]))]
        assert [f["name"] for f in await within(client.list())] == ["top.txt"]
        assert await refused(client, op="get", name="docs/inner.txt") == "invalid_name"
        assert await refused(client, op="get", name="docs") == "not_found"
        assert await refused(client, op="delete", name="docs") == "not_found"
        assert await refused(client, op="mkdir", path="x") == "unknown_op"
        assert await refused(client, op="rmdir", path="docs") == "unknown_op"
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_quotas_count_the_whole_tree_folders_included(server_factory):
    srv = await server_factory(quota=1000, quota_files=4)
    client = await connect_12(srv)
    try:
        await within(client.upload("a/b/one.bin", b"x" * 600))  # a, a/b, one.bin: 3 entries
        # Bytes: the nested file counts against the quota.
        assert await refused(client, op="save", name="top.bin", size=500) == "quota_exceeded"
        await ask(client, op="mkdir", path="c")  # the 4th entry
        # Files and folders: a 5th entry of any kind is refused...
        assert await refused(client, op="save", name="c/two.bin", size=1) == "quota_exceeded"
        assert await refused(client, op="mkdir", path="d") == "quota_exceeded"
        # Folders made on the way count: a move into x/y would add two.
        assert (
            await refused(client, op="rename", name="a/b/one.bin", to="x/y/one.bin")
            == "quota_exceeded"
        )
        await ask(client, op="rename", name="a/b/one.bin", to="c/one.bin")  # adds none
        # ...but replacing a file changes neither count.
        await within(client.upload("c/one.bin", b"y" * 900))
        assert await srv.read("c/one.bin") == b"y" * 900
    finally:
        await client.close()


async def event_for(client: Any, path: str) -> dict[str, Any]:
    """The next changed event about folder ``path`` (others skipped, bounded)."""
    for _ in range(20):
        event = await within(client.folder_changes.get())
        if event["path"] == path:
            return event
    raise AssertionError(f"no changed event for {path!r}")


@pytest_twisted.ensureDeferred
async def test_folders_created_on_the_way_are_announced_where_they_appear(server_factory):
    srv = await server_factory()
    watcher = await connect_12(srv)
    maker = await connect_12(srv)
    try:
        await ask(maker, op="mkdir", path="a/b/c", parents=True)
        assert names(await event_for(watcher, "")) == ["a"]  # "a" appeared at the top
        await within(maker.upload("x/y/f.txt", b"f"))
        assert names(await event_for(watcher, "")) == ["a", "x"]
        await ask(maker, op="rename", name="x/y/f.txt", to="a/n/m/f.txt")
        assert names(await event_for(watcher, "a")) == ["b", "n"]
    finally:
        await watcher.close()
        await maker.close()


@pytest_twisted.ensureDeferred
async def test_a_folder_cannot_move_where_its_tree_would_pass_the_path_limits(client12):
    deep = "/".join(["d"] * 20)
    await within(client12.upload(deep + "/f.bin", b"x" * 1000))
    await ask(client12, op="mkdir", path="/".join(["e"] * 12), parents=True)
    target = "/".join(["e"] * 12) + "/d"  # 12 + 21 levels: past 32
    assert await refused(client12, op="rename", name="d", to=target) == "invalid_move"
    assert await client12.srv.read(deep + "/f.bin") == b"x" * 1000  # nothing moved
    assert (await client12.srv.storage.folder(None).usage())[0] == 1000  # still counted
    await ask(client12, op="rename", name="d", to="e/d")  # within the limits: fine
    assert await client12.srv.read("e/" + deep + "/f.bin") == b"x" * 1000


@pytest_twisted.ensureDeferred
async def test_a_1_1_channel_can_neither_move_nor_overwrite_a_folder_it_cannot_see(server_factory):
    srv = await server_factory()
    await srv.put("docs/inner.txt", b"i")
    client = await within(connect(srv.url))
    try:
        assert await refused(client, op="rename", name="docs", to="other") == "not_found"
        # Refused before any data is sent, not as storage_error at commit.
        assert await refused(client, op="save", name="docs", size=5) == "exists"
        assert await srv.read("docs/inner.txt") == b"i"
    finally:
        await client.close()
