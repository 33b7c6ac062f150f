"""The local storage backend: what is listed, what can be opened, atomic saves."""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task
from twisted.internet.defer import Deferred

from wsfiles.storage import IFolder, IStorage, NotFound, StorageFailure
from wsfiles.storage.local import UPLOAD_BUFFER, LocalStorage
from wsfiles.streaming import SEND_BUFFER

KiB = 1024
MiB = 1024 * KiB
#: Every test that waits for uploads gives up after this long (a deadlock fails).
DEADLINE = 60.0


@pytest.fixture
def storage(tmp_path):
    return LocalStorage(str(tmp_path / "root"))


def test_provides_the_interfaces(storage):
    assert IStorage.providedBy(storage)
    assert IFolder.providedBy(storage.folder(None))


@pytest_twisted.ensureDeferred
async def test_lists_regular_files_only(storage, tmp_path):
    root = tmp_path / "root"
    (root / "b.txt").write_bytes(b"bb")
    (root / "a.txt").write_bytes(b"a")
    (root / "folder").mkdir()
    (root / "link-to-etc").symlink_to("/etc/passwd")
    (root / "link-to-a").symlink_to(root / "a.txt")
    (root / ".wsfiles-other").write_bytes(b"reserved")
    os.close(os.open(os.path.join(os.fsencode(root), b"bad-\xff"), os.O_CREAT | os.O_WRONLY))
    # Put there by other programs, and no command could name them: not listed.
    (root / "back\\slash").write_bytes(b"x")
    (root / "c1-\x9b").write_bytes(b"x")
    (root / "tab\there").write_bytes(b"x")
    files = await storage.folder(None).list()
    assert [(f.name, f.size) for f in files] == [("a.txt", 1), ("b.txt", 2)]


@pytest_twisted.ensureDeferred
async def test_symlinks_are_not_followed(storage, tmp_path):
    root = tmp_path / "root"
    (root / "link").symlink_to("/etc/passwd")
    folder = storage.folder(None)
    with pytest.raises(NotFound):
        await folder.open_download("link")
    with pytest.raises(NotFound):
        await folder.stat("link")
    with pytest.raises(NotFound):
        await folder.open_download("missing")


@pytest_twisted.ensureDeferred
async def test_client_folder_that_is_a_symlink_is_refused(storage, tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "x").write_bytes(b"x")
    (tmp_path / "root" / "mallory").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(StorageFailure):
        await storage.folder("mallory").list()


@pytest_twisted.ensureDeferred
async def test_client_folders_are_created_and_separate(storage, tmp_path):
    upload = await storage.folder("alice").begin_upload("a", 1)
    upload.write(b"1")
    await upload.commit()
    assert (tmp_path / "root" / "alice" / "a").read_bytes() == b"1"
    assert await storage.folder("bob").list() == []


@pytest_twisted.ensureDeferred
async def test_abort_keeps_the_old_file_and_leaves_no_temp(storage, tmp_path):
    root = tmp_path / "root"
    (root / "f").write_bytes(b"old")
    upload = await storage.folder(None).begin_upload("f", 3)
    upload.write(b"new")
    assert len(os.listdir(root / ".wsfiles-tmp")) == 1
    upload.abort()
    assert (root / "f").read_bytes() == b"old"
    assert os.listdir(root / ".wsfiles-tmp") == []


def test_sweep_removes_leftover_temp_files(tmp_path):
    LocalStorage(str(tmp_path / "root"))
    (tmp_path / "root" / ".wsfiles-tmp" / "upload-123").write_bytes(b"partial")
    again = LocalStorage(str(tmp_path / "root"))
    assert again.sweep_temporary_files() == 1
    assert os.listdir(tmp_path / "root" / ".wsfiles-tmp") == []


# -- the storage-wide upload buffer ------------------------------------------


def _within(awaitable: Any, seconds: float = DEADLINE) -> Deferred:
    return defer.ensureDeferred(awaitable).addTimeout(seconds, reactor)


def _blob(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


class _Watch:
    """The highest ``buffered_bytes`` seen right after a write (the only place it grows)."""

    def __init__(self, storage: LocalStorage) -> None:
        self.storage = storage
        self.peak = 0
        self.waits = 0

    def wrote(self, pending: Deferred | None) -> Deferred | None:
        self.peak = max(self.peak, self.storage.buffered_bytes)
        if pending is not None:
            self.waits += 1
        return pending


async def _send(watch: _Watch, upload: Any, data: bytes, chunk: int) -> None:
    """Write ``data`` as a connection would: chunk by chunk, waiting when told to."""
    for start in range(0, len(data), chunk):
        pending = watch.wrote(upload.write(data[start : start + chunk]))
        if pending is not None:
            await pending
        else:
            # Let the other uploads write too, as their sockets would.
            await task.deferLater(reactor, 0, lambda: None)


def test_the_default_budget(storage):
    assert storage.upload_buffer == UPLOAD_BUFFER == 64 * MiB
    assert storage.buffered_bytes == storage.peak_buffered_bytes == 0
    with pytest.raises(ValueError):
        LocalStorage(storage.root, upload_buffer=-1)


@pytest.mark.parametrize("budget", [0, 256 * KiB, 3 * MiB])
@pytest_twisted.ensureDeferred
async def test_concurrent_uploads_stay_within_the_budget(tmp_path, budget):
    """Many uploads at once, plain and resumable, small (under one batch) and
    large (several batches): never more than the budget plus one chunk per
    upload is held unwritten, every file arrives intact, none is stuck."""
    storage = LocalStorage(str(tmp_path / "root"), upload_buffer=budget)
    assert storage.upload_buffer == budget
    watch = _Watch(storage)
    chunk = 16 * KiB
    rng = random.Random(budget)
    files = {
        f"f{i:02d}": _blob(rng.choice([0, 1, 5 * KiB, 64 * KiB, rng.randrange(1, 3 * MiB)]), i)
        for i in range(40)
    }

    async def one(index: int, name: str, data: bytes) -> str:
        client = f"c{index % 4}"
        upload = await storage.folder(client).begin_upload(name, len(data), resume=index % 3 == 0)
        await _send(watch, upload, data, chunk)
        return await upload.commit()

    digests = await _within(
        defer.gatherResults(
            [defer.ensureDeferred(one(i, n, d)) for i, (n, d) in enumerate(files.items())]
        )
    )

    for index, ((name, data), digest) in enumerate(zip(files.items(), digests, strict=True)):
        assert digest == hashlib.sha256(data).hexdigest()
        stored = (tmp_path / "root" / f"c{index % 4}" / name).read_bytes()
        assert hashlib.sha256(stored).hexdigest() == digest
    assert watch.waits > 0  # the budget did hold uploads back
    assert watch.peak <= budget + len(files) * chunk
    assert storage.peak_buffered_bytes == watch.peak
    assert storage.buffered_bytes == 0
    assert os.listdir(tmp_path / "root" / ".wsfiles-tmp") == []


@pytest_twisted.ensureDeferred
async def test_a_waiting_upload_is_not_stranded_by_an_idle_partial_batch(storage):
    """An upload that stops sending with a partly filled batch must not hold
    the others back forever: its batch goes to the writer when the budget is
    exceeded, so the total drains."""
    storage = LocalStorage(storage.root, upload_buffer=100 * KiB)
    folder = storage.folder(None)
    idle = await folder.begin_upload("idle", 120 * KiB)
    busy = await folder.begin_upload("busy", 120 * KiB)
    idle_data, busy_data = _blob(120 * KiB, 1), _blob(120 * KiB, 2)
    assert idle.write(idle_data[: 60 * KiB]) is None  # then it goes quiet
    pending = busy.write(busy_data[: 60 * KiB])
    assert pending is not None
    assert storage.buffered_bytes == 120 * KiB
    await _within(pending)  # drains although "idle" sends nothing more
    assert storage.buffered_bytes <= 50 * KiB
    for upload, data in ((busy, busy_data), (idle, idle_data)):
        pending = upload.write(data[60 * KiB :])
        if pending is not None:
            await _within(pending)
    assert await _within(busy.commit()) == hashlib.sha256(busy_data).hexdigest()
    assert await _within(idle.commit()) == hashlib.sha256(idle_data).hexdigest()
    assert (Path(storage.root) / "idle").read_bytes() == idle_data
    assert (Path(storage.root) / "busy").read_bytes() == busy_data
    assert storage.buffered_bytes == 0


@pytest_twisted.ensureDeferred
async def test_ending_a_waiting_upload_lets_it_and_the_others_go(storage):
    """An upload told to wait and then aborted is released at once, and its
    dropped bytes no longer count; those waiting behind it go on."""
    storage = LocalStorage(storage.root, upload_buffer=64 * KiB)
    folder = storage.folder(None)
    first = await folder.begin_upload("first", 200 * KiB)
    second = await folder.begin_upload("second", 10 * KiB)
    first_waits = first.write(_blob(100 * KiB, 3))
    second_data = _blob(10 * KiB, 4)
    second_waits = second.write(second_data)  # others are waiting: a newcomer waits too
    assert first_waits is not None and second_waits is not None
    first.abort()
    assert first_waits.called
    await _within(second_waits)
    assert await _within(second.commit()) == hashlib.sha256(second_data).hexdigest()
    assert storage.buffered_bytes == 0
    assert sorted(os.listdir(storage.root)) == [".wsfiles-partial", ".wsfiles-tmp", "second"]
    assert os.listdir(os.path.join(storage.root, ".wsfiles-tmp")) == []


@pytest_twisted.ensureDeferred
async def test_an_interrupted_resumable_upload_keeps_what_the_budget_held(storage):
    """Bytes accepted while the budget was exceeded are kept by an interruption,
    and the resume carries on from exactly there."""
    storage = LocalStorage(storage.root, upload_buffer=64 * KiB)
    folder = storage.folder("alice")
    data = _blob(300 * KiB, 5)
    upload = await folder.begin_upload("big", len(data), resume=True)
    assert upload.write(data[: 40 * KiB]) is None
    waiting = upload.write(data[40 * KiB : 120 * KiB])
    assert waiting is not None
    await _within(upload.interrupt())
    assert waiting.called
    again = await _within(folder.begin_upload("big", len(data), resume=True))
    assert again.offset == 120 * KiB
    await _within(_send(_Watch(storage), again, data[again.offset :], 32 * KiB))
    assert await _within(again.commit()) == hashlib.sha256(data).hexdigest()
    assert (Path(storage.root) / "alice" / "big").read_bytes() == data
    assert storage.buffered_bytes == 0


@pytest_twisted.ensureDeferred
async def test_uploads_through_the_server_stay_within_the_budget(server_factory, tmp_path):
    """End to end: clients uploading at once over WebSockets are paused by the
    storage-wide budget (their connections stop being read) and all files
    arrive intact."""
    budget = 512 * KiB
    storage = LocalStorage(str(tmp_path / "shared-root"), upload_buffer=budget)
    srv = await server_factory(storage=storage)
    files = {
        f"e{i}": _blob(random.Random(i).randrange(64 * KiB, 3 * MiB), 100 + i) for i in range(12)
    }

    async def one(name: str, data: bytes) -> dict[str, Any]:
        client = await srv.connect()
        return await client.upload(name, data)

    acks = await _within(
        defer.gatherResults([defer.ensureDeferred(one(n, d)) for n, d in files.items()])
    )
    for (name, data), ack in zip(files.items(), acks, strict=True):
        assert ack["sha256"] == hashlib.sha256(data).hexdigest()
        assert (tmp_path / "shared-root" / name).read_bytes() == data
    # A connection is paused after the read that crossed the budget: at most
    # one read more per upload (the file channel reads up to SEND_BUFFER).
    assert storage.peak_buffered_bytes <= budget + len(files) * max(SEND_BUFFER, 64 * KiB)
    assert storage.buffered_bytes == 0


# -- a stored file's SHA-256 is remembered, so downloads need not hash it again --


async def _read_all(download: Any) -> tuple[bytes, str]:
    """Stream a download into memory; return its bytes and the digest it reports."""
    from twisted.internet import interfaces
    from zope.interface import implementer

    @implementer(interfaces.IConsumer)
    class Sink:
        def __init__(self) -> None:
            self.data = bytearray()

        def registerProducer(self, producer: Any, streaming: bool) -> None:
            pass

        def unregisterProducer(self) -> None:
            pass

        def write(self, data: bytes) -> None:
            self.data += data

    sink = Sink()
    prefix = await download.prefix_sha256()
    try:
        await download.stream_to(sink, prefix)
    finally:
        download.close()
    return bytes(sink.data), prefix.hexdigest()


@pytest_twisted.ensureDeferred
async def test_a_saved_file_is_downloaded_without_hashing_it_again(storage, tmp_path, monkeypatch):
    data = _blob(3 * MiB + 7, seed=5)
    folder = storage.folder(None)
    upload = await folder.begin_upload("f", len(data))
    await _send(_Watch(storage), upload, data, 256 * KiB)
    await upload.commit()

    hashed: list[int] = []  # bytes fed to any SHA-256 made from now on
    real = hashlib.sha256

    class Counting:
        def __init__(self, *args: Any) -> None:
            self._inner = real(*args)

        def update(self, chunk: bytes) -> None:
            hashed.append(len(chunk))
            self._inner.update(chunk)

        def hexdigest(self) -> str:
            return self._inner.hexdigest()

    monkeypatch.setattr(hashlib, "sha256", Counting)
    for offset in (0, MiB + 3):  # whole, and ranged: still the whole file's digest
        got, digest = await _read_all(await folder.open_download("f", offset))
        assert got == data[offset:]
        assert digest == hashlib.sha256(data).hexdigest()
    assert sum(hashed) == 0  # neither the bytes sent nor a ranged get's prefix were hashed
    # The control: a file the server did not write (no record) is hashed.
    (tmp_path / "root" / "g").write_bytes(data)
    got, digest = await _read_all(await folder.open_download("g"))
    assert (got, digest) == (data, hashlib.sha256(data).hexdigest())
    assert sum(hashed) == len(data)


@pytest_twisted.ensureDeferred
async def test_a_file_changed_behind_the_servers_back_is_hashed_again(storage, tmp_path):
    data = _blob(MiB, seed=6)
    folder = storage.folder(None)
    upload = await folder.begin_upload("f", len(data))
    await _send(_Watch(storage), upload, data, 256 * KiB)
    await upload.commit()
    path = tmp_path / "root" / "f"
    changed = _blob(MiB, seed=7)  # same size, new mtime
    stamp = path.stat().st_mtime_ns
    path.write_bytes(changed)
    os.utime(path, ns=(stamp + 1_000_000, stamp + 1_000_000))
    got, digest = await _read_all(await folder.open_download("f"))
    assert got == changed
    assert digest == hashlib.sha256(changed).hexdigest()


@pytest_twisted.ensureDeferred
async def test_a_file_forged_behind_the_servers_back_is_caught_by_the_client(server, tmp_path):
    """Changed in place with its size and mtime put back, a file goes out under
    its recorded hash; the client, which hashes what it receives, refuses it."""
    import io

    from wsfiles.client import CHECKSUM_MISMATCH, WsfilesError

    client = await server.connect()
    data = _blob(2 * MiB, seed=8)
    await client.upload("f", data)
    path = server.root / "f"
    before = path.stat()
    with path.open("r+b") as f:
        f.seek(MiB)
        f.write(b"X")
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    with pytest.raises(WsfilesError) as caught:
        await client.download("f", io.BytesIO())
    assert caught.value.code == CHECKSUM_MISMATCH


@pytest_twisted.ensureDeferred
async def test_a_file_changed_during_a_download_fails_it_rather_than_send_a_stale_hash(
    storage, tmp_path
):
    from wsfiles.streaming import StreamFailed

    data = _blob(MiB, seed=9)
    folder = storage.folder(None)
    upload = await folder.begin_upload("f", len(data))
    await _send(_Watch(storage), upload, data, 256 * KiB)
    await upload.commit()
    download = await folder.open_download("f")  # the record holds now
    path = tmp_path / "root" / "f"
    with path.open("r+b") as f:  # changed in place, as another program might
        f.write(b"Y")
    stamp = path.stat().st_mtime_ns + 1_000_000
    os.utime(path, ns=(stamp, stamp))
    with pytest.raises(StreamFailed, match="changed while it was being sent"):
        await _read_all(download)
