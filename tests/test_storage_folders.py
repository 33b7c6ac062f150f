"""Protocol 1.2 folders at the storage boundary: one behaviour table, run through
IFolder against local folders and against S3 (a Ceph RGW), so both backends
answer every folder operation the same way (docs/protocol.md, "Folders")."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import time
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, interfaces, reactor
from zope.interface import implementer

from wsfiles.storage import (
    Exists,
    IsAFolder,
    NotAFolder,
    NotEmpty,
    NotFound,
    StorageFailure,
    path_key,
)
from wsfiles.storage.local import LocalStorage
from wsfiles.storage.s3 import MOVE_STALE_AFTER

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
    store = _s3_store(backend)
    yield store
    pytest_twisted.blockon(store.storage.close())


def _s3_store(rgw: Any, bucket: str | None = None) -> Store:
    """CLIENT's folder in a bucket of the Ceph RGW (a fresh bucket unless given:
    another S3Storage on the same bucket is another instance, or a restart)."""
    from wsfiles.storage.s3 import S3Client, S3Storage

    if bucket is None:
        bucket = "wsfiles-" + secrets.token_hex(6)
        rgw.create_bucket(bucket)
    client = S3Client(reactor, rgw.endpoint, bucket, rgw.access_key, rgw.secret_key)

    def plant_s3(path: str, data: bytes) -> None:
        response = rgw.request("PUT", bucket, f"{CLIENT}/{path}", body=data)
        assert response.status == 200, response.body

    store = Store(S3Storage(client), "s3", plant_s3)
    store.rgw, store.bucket = rgw, bucket
    return store


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


@pytest_twisted.ensureDeferred
async def test_mkdir_and_rmdir(store):
    folder = store.folder
    await folder.mkdir("empty", False)
    assert await folder.kind("empty") == "folder"
    assert shown(await everything(folder)) == [("empty", "folder")]
    assert await everything(folder, "empty") == []
    with pytest.raises(Exists):
        await folder.mkdir("empty", False)
    await folder.mkdir("empty", True)  # mkdir -p: an existing folder is fine
    with pytest.raises(NotFound):
        await folder.mkdir("p/q", False)
    await folder.mkdir("p/q/r", True)
    assert shown(await everything(folder)) == [
        ("empty", "folder"),
        ("p", "folder"),
        ("p/q", "folder"),
        ("p/q/r", "folder"),
    ]
    await put(folder, "f", b"file")
    for parents in (False, True):
        with pytest.raises(Exists):
            await folder.mkdir("f", parents)
        with pytest.raises(NotAFolder):
            await folder.mkdir("f/g", parents)
    assert await folder.usage() == (4, 5)

    with pytest.raises(NotEmpty):
        await folder.rmdir("p", False)
    with pytest.raises(NotAFolder):
        await folder.rmdir("f", False)
    with pytest.raises(NotFound):
        await folder.rmdir("nothing", True)
    await folder.rmdir("p/q/r", False)
    assert shown(await everything(folder, "p")) == [("q", "folder")]  # its parent stays
    await put(folder, "p/q/deep/x", b"x")
    await folder.rmdir("p", True)
    await folder.rmdir("empty", False)
    assert shown(await everything(folder)) == [("f", 4)]
    assert await folder.kind("p") is None
    await put(folder, "keep/gone/x", b"x")
    await folder.rmdir("keep/gone", True)
    assert shown(await everything(folder)) == [("f", 4), ("keep", "folder")]


@pytest_twisted.ensureDeferred
async def test_rename_moves_files_and_folders(store):
    folder = store.folder
    await put_tree(folder)
    await folder.rename("a.txt", "new/place/a.txt", False)  # parents of `to` are made
    assert await get(folder, "new/place/a.txt") == b"1"
    await folder.rename("a", "new/a2", False)
    assert shown(await everything(folder, "new")) == [
        ("a2", "folder"),
        ("a2/b", "folder"),
        ("a2/b/c", "folder"),
        ("a2/b/c/d.txt", 2),
        ("a2/b c", "folder"),
        ("a2/b c/e", 1),
        ("a2/b-2", "folder"),
        ("a2/b-2/f", 1),
        ("a2/b.txt", 4),
        ("place", "folder"),
        ("place/a.txt", 1),
    ]
    assert await folder.kind("a") is None
    assert await get(folder, "new/a2/b/c/d.txt") == b"66"
    # A folder moved out of a folder leaves it there, empty.
    await folder.rename("docs/report", "report", False)
    assert shown(await everything(folder, "docs")) == [("report.pdf", 1)]
    await folder.rename("\u00fc/\u00df", "\u00df", False)
    assert shown(await everything(folder, "\u00fc")) == []
    await folder.mkdir("hollow", False)
    await folder.rename("hollow", "x/hollow", False)
    assert shown(await everything(folder, "x")) == [("hollow", "folder")]
    files = sum(len(data) for data in TREE.values())
    assert (await folder.usage())[0] == files


@pytest_twisted.ensureDeferred
async def test_rename_refusals(store):
    folder = store.folder
    await put(folder, "f", b"file")
    await put(folder, "g", b"gg")
    await put(folder, "d/inside", b"i")
    await put(folder, "e/inside", b"j")
    with pytest.raises(NotFound):
        await folder.rename("nothing", "x", True)
    with pytest.raises(Exists):
        await folder.rename("f", "g", False)
    for overwrite in (False, True):
        with pytest.raises(Exists):  # a folder replaces nothing...
            await folder.rename("d", "f", overwrite)
        with pytest.raises(Exists):
            await folder.rename("d", "e", overwrite)
        with pytest.raises(Exists):  # ...and nothing replaces a folder
            await folder.rename("f", "d", overwrite)
        with pytest.raises(NotAFolder):
            await folder.rename("g", "f/below", overwrite)
    await folder.rename("f", "g", True)
    assert await get(folder, "g") == b"file"
    assert shown(await everything(folder)) == [
        ("d", "folder"),
        ("d/inside", 1),
        ("e", "folder"),
        ("e/inside", 1),
        ("g", 4),
    ]


# -- S3: a folder rename is copy and delete per object, under a journal -------


def _keys(store: Store, prefix: str) -> list[str]:
    import xml.etree.ElementTree as ElementTree

    response = store.rgw.request(
        "GET", store.bucket, query={"list-type": "2", "prefix": f"{CLIENT}/{prefix}"}
    )
    assert response.status == 200, response.body
    root = ElementTree.fromstring(response.body)
    return [e.text[len(CLIENT) + 1 :] for e in root.iter() if e.tag.endswith("}Key") and e.text]


MOVED = {f"src/{name}": data for name, data in TREE.items()}


def _fail_the_fourth_copy(store: Store, monkeypatch: Any) -> None:
    """The object store fails a server-side copy half-way through a move."""
    from wsfiles.storage import StorageFailure as Failed

    client = store.storage.client
    real_send = client.send
    copies = []

    def send(method: str, key: str = "", *args: Any, headers: Any = None, **kw: Any) -> Any:
        if headers and "x-amz-copy-source" in headers:
            copies.append(key)
            if len(copies) == 4:
                from twisted.internet import defer

                return defer.fail(Failed("the object store answered 503"))
        return real_send(method, key, *args, headers=headers, **kw)

    monkeypatch.setattr(client, "send", send)


@pytest_twisted.async_yield_fixture
async def s3_store(ceph_rgw):
    store = _s3_store(ceph_rgw)
    yield store
    await store.storage.close()


@pytest.mark.timeout(300)
@pytest_twisted.ensureDeferred
async def test_an_interrupted_folder_rename_is_finished_by_the_next_operation(
    s3_store, monkeypatch
):
    store = s3_store
    folder = store.folder
    for name, data in MOVED.items():
        await put(folder, name, data)
    store.storage.client.list_page = 2  # several pages: the journal records progress
    _fail_the_fourth_copy(store, monkeypatch)
    with pytest.raises(StorageFailure):
        await folder.rename("src", "dst/moved", False)
    monkeypatch.undo()

    # Half-way: the journal says what was under way; every file is under one
    # name or the other, none lost.
    [journal] = _keys(store, ".wsfiles-moves/")
    response = store.rgw.request("GET", store.bucket, f"{CLIENT}/{journal}")
    record = json.loads(response.body)
    assert (record["from"], record["to"], record["moved"]) == ("src", "dst/moved", 2)
    left = {key[len("src/") :] for key in _keys(store, "src/")}
    arrived = {key[len("dst/moved/") :] for key in _keys(store, "dst/moved/")}
    assert left and arrived and left | arrived == set(TREE)

    # The next operation on the folder finishes the move first.
    listed = shown(await everything(folder))
    assert listed == [("dst", "folder"), ("dst/moved", "folder")] + [
        (f"dst/moved/{name}", kind) for name, kind in TREE_LISTED
    ]
    for name, data in TREE.items():
        assert await get(folder, f"dst/moved/{name}") == data
    assert _keys(store, ".wsfiles-moves/") == []
    assert _keys(store, "src/") == []


@pytest.mark.timeout(300)
@pytest_twisted.ensureDeferred
async def test_a_move_left_by_a_dead_instance_is_finished_and_a_live_ones_left_alone(
    s3_store, monkeypatch
):
    store = s3_store
    for name, data in MOVED.items():
        await put(store.folder, name, data)
    _fail_the_fourth_copy(store, monkeypatch)
    with pytest.raises(StorageFailure):
        await store.folder.rename("src", "dst", False)
    monkeypatch.undo()
    first = store.storage.client.instance_id
    before = sorted(_keys(store, ""))

    other = _s3_store(store.rgw, store.bucket)  # another instance of the cluster
    try:
        alive: dict[str, bool | None] = {first: True}
        other.storage.share_instance("other", lambda i: defer.succeed(alive.get(i)))
        await other.folder.kind("src")  # the mover is alive: its move is its own
        assert sorted(_keys(store, "")) == before
        # A save below the source after the move began is not part of the move.
        await put(other.folder, "src/later.txt", b"saved later")
        alive[first] = None  # Redis is down: nobody can tell, and the journal is fresh
        await other.folder.kind("src")
        assert sorted(_keys(store, "")) == sorted([*before, "src/later.txt"])
        # Nobody rewrote the journal for longer than a live mover would leave it.
        other.storage.moves.clock = lambda: time.time() + MOVE_STALE_AFTER + 60
        assert await other.folder.kind("src") == "folder"
        assert _keys(store, ".wsfiles-moves/") == []
        assert _keys(store, "src/") == ["src/later.txt"]
        for name, data in TREE.items():
            assert await get(other.folder, f"dst/{name}") == data
    finally:
        await other.storage.close()


@pytest_twisted.ensureDeferred
async def test_whose_move_is_abandoned():
    from wsfiles.storage.s3 import _Moves

    class Client:
        instance_id = "me"

    moves = _Moves(Client())  # type: ignore[arg-type]
    now = time.time()
    fresh, stale = now - 10, now - MOVE_STALE_AFTER - 10
    assert await moves.abandoned({"instance": "me"}, fresh)  # ours: it failed
    for answer, expected in [(True, False), (False, True)]:
        moves.instance_alive = lambda i, answer=answer: defer.succeed(answer)
        assert await moves.abandoned({"instance": "x"}, fresh) is expected
    for alive in (None, lambda i: defer.succeed(None)):  # no Redis; Redis down
        moves.instance_alive = alive
        assert not await moves.abandoned({"instance": "x"}, fresh)
        assert await moves.abandoned({"instance": "x"}, stale)


@pytest.mark.timeout(300)
@pytest_twisted.ensureDeferred
async def test_the_sweep_finishes_an_interrupted_folder_rename(s3_store, monkeypatch):
    store = s3_store
    for name, data in MOVED.items():
        await put(store.folder, name, data)
    _fail_the_fourth_copy(store, monkeypatch)
    with pytest.raises(StorageFailure):
        await store.folder.rename("src", "dst", False)
    monkeypatch.undo()
    await store.storage.sweep_partials(3600)
    assert _keys(store, ".wsfiles-moves/") == []
    assert _keys(store, "src/") == []
    assert sorted(_keys(store, "dst/")) == sorted(f"dst/{name}" for name in TREE)


def _count_listings(store: Store, monkeypatch: Any) -> list[int]:
    """Count the store's list requests (ListObjectsV2) from now on: one cell."""
    client = store.storage.client
    real_send = client.send
    count = [0]

    def send(method: str, key: str = "", *args: Any, params: Any = None, **kw: Any) -> Any:
        if method == "GET" and params and "list-type" in params:
            count[0] += 1
        return real_send(method, key, *args, params=params, **kw)

    monkeypatch.setattr(client, "send", send)
    return count


@pytest.mark.parametrize("recursive", [False, True])
@pytest_twisted.ensureDeferred
async def test_each_page_of_a_folder_of_dashed_names_costs_the_same(
    s3_store, monkeypatch, recursive
):
    # The store lists keys "log/..." after "log-00001.txt" though a listing
    # sorts them before it: a page must not read to the end of the folder to
    # rule out a folder "log" (quadratic in the pages a client reads).
    store = s3_store
    names = [f"log-{i:05d}.txt" for i in range(40)]
    for name in names:
        store.plant(name, b"x")
    names.append("log-00019-b.txt")
    store.plant("log-00019-b.txt", b"x")
    store.plant("log-00019/inner", b"y")  # a folder in doubt that does exist
    inside = ["log-00019", "log-00019/inner"] if recursive else ["log-00019"]
    expected = sorted(names + inside, key=path_key)
    store.storage.client.list_page = 2
    requests = _count_listings(store, monkeypatch)
    found: list[str] = []
    costs: list[int] = []
    cursor = None
    for _ in range(30):  # bounded: 9 pages of 5
        before = requests[0]
        page = await store.folder.entries("", recursive, cursor, 5)
        costs.append(requests[0] - before)
        found += [entry.name for entry in page[:5]]
        if len(page) <= 5:
            break
        cursor = page[4].name
    assert found == expected
    # Three store pages of 2 for the 6 entries a page needs, a probe or two for
    # the folders in doubt, the move journals once: never more, wherever it is.
    assert max(costs) <= 6, costs


@pytest_twisted.ensureDeferred
async def test_whole_tree_operations_take_at_most_two_threads_at_once(tmp_path, monkeypatch):
    """Recursive removals and quota walks share Twisted's thread pool with
    upload writes and token checks: a client cannot occupy all of it."""
    import threading

    from twisted.internet import defer, threads

    import wsfiles.storage.local as local

    folder = LocalStorage(str(tmp_path / "root")).folder(None)
    release = threading.Event()
    running: list[int] = []
    peak: list[int] = [0]
    lock = threading.Lock()
    real = local._tree_usage

    def slow_usage(fd: int, depth: int) -> tuple[int, int]:
        with lock:
            running.append(1)
            peak[0] = max(peak[0], len(running))
        release.wait(10)
        with lock:
            running.pop()
        return real(fd, depth)

    monkeypatch.setattr(local, "_tree_usage", slow_usage)
    walks = [folder.usage() for _ in range(6)]
    for _ in range(200):  # bounded: let the pool start what it may
        if len(running) >= local.TREE_OPERATIONS_AT_ONCE:
            break
        await threads.deferToThread(lambda: None)
    assert len(running) == local.TREE_OPERATIONS_AT_ONCE
    release.set()
    assert await defer.gatherResults(walks) == [(0, 0)] * 6
    assert peak[0] == local.TREE_OPERATIONS_AT_ONCE
