"""Protocol 1.2 folders at the storage boundary: one behaviour table, run through
IFolder against local folders and against S3 (a Ceph RGW), so both backends
answer every folder operation the same way (docs/protocol.md, "Folders")."""

from __future__ import annotations

import hashlib
import os
import secrets
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import interfaces, reactor
from zope.interface import implementer

from wsfiles.storage import (
    IsAFolder,
    LocalStorage,
    NotAFolder,
    NotFound,
    StorageFailure,
    path_key,
)

pytestmark = pytest.mark.every_backend

CLIENT = "alice"


class Store:
    """One backend's folder of CLIENT, and a way to put files behind its back."""

    def __init__(self, storage: Any, kind: str, plant: Any) -> None:
        self.storage = storage
        self.kind = kind
        self.folder = storage.folder(CLIENT)
        self.plant = plant  # plant(path, data): as another program would


@pytest.fixture
def store(backend, tmp_path):
    if backend is None:
        root = tmp_path / "root"
        storage = LocalStorage(str(root))

        def plant_local(path: str, data: bytes) -> None:
            target = root / CLIENT / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)

        yield Store(storage, "local", plant_local)
        return
    from wsfiles.s3storage import S3Client, S3Storage

    bucket = "wsfiles-" + secrets.token_hex(6)
    backend.create_bucket(bucket)
    client = S3Client(reactor, backend.endpoint, bucket, backend.access_key, backend.secret_key)
    storage = S3Storage(client)

    def plant_s3(path: str, data: bytes) -> None:
        response = backend.request("PUT", bucket, f"{CLIENT}/{path}", body=data)
        assert response.status == 200, response.body

    store = Store(storage, "s3", plant_s3)
    store.rgw, store.bucket = backend, bucket
    yield store
    pytest_twisted.blockon(storage.close())


async def put(folder: Any, name: str, data: bytes) -> None:
    upload = await folder.begin_upload(name, len(data), hashlib.sha256(data).hexdigest())
    if data:
        waiting = upload.write(data)
        if waiting is not None:
            await waiting
    await upload.commit()


@implementer(interfaces.IConsumer)
class _Sink:
    def __init__(self) -> None:
        self.data = bytearray()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        pass

    def unregisterProducer(self) -> None:
        pass

    def write(self, data: bytes) -> None:
        self.data += data


async def get(folder: Any, name: str) -> bytes:
    download = await folder.open_download(name)
    sink = _Sink()
    try:
        await download.stream_to(sink, await download.prefix_sha256())
    finally:
        download.close()
    return bytes(sink.data)


def shown(entries: list[Any]) -> list[tuple[str, Any]]:
    """Entries as a user sees them: name and size, or "folder"."""
    return [(e.name, e.as_entry().get("size", "folder")) for e in entries]


async def everything(folder: Any, path: str = "", recursive: bool = True) -> list[Any]:
    return await folder.entries(path, recursive, None, 10_000)


async def paged(folder: Any, path: str, recursive: bool, limit: int) -> list[Any]:
    """Every entry, a page of ``limit`` at a time, as a client follows cursors."""
    found: list[Any] = []
    cursor = None
    for _ in range(200):  # bounded: more pages than the table has entries
        page = await folder.entries(path, recursive, cursor, limit)
        assert len(page) <= limit + 1
        found += page[:limit]
        if len(page) <= limit:
            return found
        cursor = page[limit - 1].name
    raise AssertionError("the pages never ended")


# Names with characters that sort before '/' (space, '-', '.'): in an object
# store's key order "a b/y" and "a-c" come before "a/...", in a listing after.
TREE = {
    "a.txt": b"1",
    "a-c": b"22",
    "a b/y": b"333",
    "a/b.txt": b"4444",
    "a/b c/e": b"5",
    "a/b/c/d.txt": b"66",
    "a/b-2/f": b"7",
    "docs/report.pdf": b"8",
    "docs/report/1": b"9",
    "z": b"",
    "\u00fc/\u00df": b"10",
}
TREE_LISTED = [
    ("a", "folder"),
    ("a/b", "folder"),
    ("a/b/c", "folder"),
    ("a/b/c/d.txt", 2),
    ("a/b c", "folder"),
    ("a/b c/e", 1),
    ("a/b-2", "folder"),
    ("a/b-2/f", 1),
    ("a/b.txt", 4),
    ("a b", "folder"),
    ("a b/y", 3),
    ("a-c", 2),
    ("a.txt", 1),
    ("docs", "folder"),
    ("docs/report", "folder"),
    ("docs/report/1", 1),
    ("docs/report.pdf", 1),
    ("z", 0),
    ("\u00fc", "folder"),
    ("\u00fc/\u00df", 2),
]


async def put_tree(folder: Any) -> None:
    for name, data in TREE.items():
        await put(folder, name, data)


@pytest_twisted.ensureDeferred
async def test_listings_of_one_folder_and_of_the_tree(store):
    folder = store.folder
    await put_tree(folder)
    assert shown(await everything(folder)) == TREE_LISTED
    assert [name for name, _ in TREE_LISTED] == sorted(
        (name for name, _ in TREE_LISTED), key=path_key
    )
    assert shown(await everything(folder, recursive=False)) == [
        ("a", "folder"),
        ("a b", "folder"),
        ("a-c", 2),
        ("a.txt", 1),
        ("docs", "folder"),
        ("z", 0),
        ("\u00fc", "folder"),
    ]
    assert shown(await everything(folder, "a", recursive=False)) == [
        ("b", "folder"),
        ("b c", "folder"),
        ("b-2", "folder"),
        ("b.txt", 4),
    ]
    assert shown(await everything(folder, "a/b")) == [("c", "folder"), ("c/d.txt", 2)]
    # The 1.1 listing still shows the top level's files only.
    assert [(f.name, f.size) for f in await folder.list()] == [("a-c", 2), ("a.txt", 1), ("z", 0)]


@pytest.mark.parametrize("limit", [1, 2, 3, 7])
@pytest_twisted.ensureDeferred
async def test_pages_follow_each_other_in_listing_order(store, limit):
    folder = store.folder
    await put_tree(folder)
    if store.kind == "s3":
        store.storage.client.list_page = 2  # the store's own pages are small too
    assert shown(await paged(folder, "", True, limit)) == TREE_LISTED
    assert [n for n, _ in shown(await paged(folder, "", False, limit))] == [
        "a",
        "a b",
        "a-c",
        "a.txt",
        "docs",
        "z",
        "\u00fc",
    ]
    assert [n for n, _ in shown(await paged(folder, "a", True, limit))] == [
        name[2:] for name, _ in TREE_LISTED if name.startswith("a/")
    ]


@pytest_twisted.ensureDeferred
async def test_a_page_is_limit_plus_one_entries_after_the_cursor(store):
    folder = store.folder
    await put_tree(folder)
    page = await folder.entries("", True, "a/b c/e", 3)
    assert shown(page) == [("a/b-2", "folder"), ("a/b-2/f", 1), ("a/b.txt", 4), ("a b", "folder")]
    page = await folder.entries("", False, "a-c", 10)
    assert shown(page) == [("a.txt", 1), ("docs", "folder"), ("z", 0), ("\u00fc", "folder")]
    assert await folder.entries("", True, "\u00fc/\u00df", 5) == []
    assert await folder.entries("a/b", False, "c", 5) == []


@pytest_twisted.ensureDeferred
async def test_listing_a_file_or_nothing_is_refused(store):
    folder = store.folder
    await put_tree(folder)
    for recursive in (False, True):
        with pytest.raises(NotAFolder):
            await folder.entries("a.txt", recursive, None, 10)
        with pytest.raises(NotFound):
            await folder.entries("nothing", recursive, None, 10)
        with pytest.raises(NotFound):
            await folder.entries("a/nothing", recursive, None, 10)
        with pytest.raises(NotAFolder):
            await folder.entries("a.txt/below", recursive, None, 10)
    assert await everything(store.storage.folder("nobody")) == []


@pytest_twisted.ensureDeferred
async def test_kind_and_usage_of_the_tree(store):
    folder = store.folder
    assert await folder.usage() == (0, 0)
    await put_tree(folder)
    assert await folder.kind("a") == "folder"
    assert await folder.kind("a/b/c") == "folder"
    assert await folder.kind("a/b/c/d.txt") == "file"
    assert await folder.kind("a.txt") == "file"
    assert await folder.kind("a/nothing") is None
    assert await folder.kind("nothing/at/all") is None
    with pytest.raises(NotAFolder):
        await folder.kind("a.txt/x")
    with pytest.raises(NotAFolder):
        await folder.kind("a/b.txt/x/y")
    files = sum(len(data) for data in TREE.values())
    assert await folder.usage() == (files, len(TREE_LISTED))


@pytest_twisted.ensureDeferred
async def test_names_no_command_could_address_are_never_listed(store):
    folder = store.folder
    await put(folder, "a/kept", b"k")
    store.plant(".wsfiles-moves/x.json", b"{}")
    store.plant("a/.wsfiles-partial", b"p")
    store.plant("a/back\\slash", b"x")
    store.plant("a/tab\there/deep", b"x")
    assert shown(await everything(folder)) == [("a", "folder"), ("a/kept", 1)]
    assert shown(await everything(folder, "a", recursive=False)) == [("kept", 1)]
    assert await folder.usage() == (1, 2)


@pytest_twisted.ensureDeferred
async def test_nested_save_get_and_delete(store):
    folder = store.folder
    await put(folder, "x/y/z.bin", b"nested")
    assert await get(folder, "x/y/z.bin") == b"nested"
    assert (await folder.stat("x/y/z.bin")).size == 6
    with pytest.raises(IsAFolder):
        await folder.stat("x/y")
    with pytest.raises(IsAFolder):
        await folder.open_download("x")
    with pytest.raises(NotFound):
        await folder.open_download("x/nothing")
    with pytest.raises(IsAFolder):
        await folder.delete("x/y")
    with pytest.raises(NotFound):
        await folder.delete("x/y/nothing")
    await folder.delete("x/y/z.bin")
    # The folders stay, empty, as on a disk.
    assert shown(await everything(folder)) == [("x", "folder"), ("x/y", "folder")]
    assert await folder.usage() == (0, 2)


@pytest_twisted.ensureDeferred
async def test_a_save_is_refused_where_a_file_or_folder_is_in_the_way(store):
    folder = store.folder
    await put(folder, "f", b"file")
    await put(folder, "d/inside", b"i")
    with pytest.raises(NotAFolder):
        await put(folder, "f/below", b"no")
    with pytest.raises((IsAFolder, StorageFailure)):  # local: rename(2) onto a folder fails
        await put(folder, "d", b"no")
    assert await folder.kind("d") == "folder"
    assert shown(await everything(folder)) == [("d", "folder"), ("d/inside", 1), ("f", 4)]


@pytest_twisted.ensureDeferred
async def test_a_resumable_save_of_a_nested_path(store):
    folder = store.folder
    data = os.urandom(3000)
    upload = await folder.begin_upload("r/s/t.bin", len(data), None, resume=True)
    upload.write(data[:1000])
    await upload.interrupt()
    upload = await folder.begin_upload("r/s/t.bin", len(data), None, resume=True)
    waiting = upload.write(data[upload.offset :])
    if waiting is not None:
        await waiting
    await upload.commit()
    assert await get(folder, "r/s/t.bin") == data
    assert shown(await everything(folder)) == [
        ("r", "folder"),
        ("r/s", "folder"),
        ("r/s/t.bin", 3000),
    ]
