"""The local-folder backend (wsfiles.storage's interface on a file system).

The local backend writes, hashes, fsyncs and renames uploads in a
thread; quick metadata operations (list, stat, open, delete, rename) run
inline on the reactor thread.

Local layout (see docs/protocol.md):

- ``ROOT`` is the anonymous client's folder; ``ROOT/NAME`` is client NAME's.
- ``ROOT/.wsfiles-tmp/`` holds uploads in progress.  No valid file name can
  reach it (names starting with ``.wsfiles-`` are reserved), it is never
  listed, and it is emptied at start-up.
- ``ROOT/.wsfiles-partial/CLIENT/`` keeps interrupted resumable uploads (a
  ``.part`` file and a ``.json`` record each) until they are resumed or swept.

Memory: each upload gathers received bytes in a batch (WRITE_BATCH) for its
writer thread and may have up to MAX_IN_FLIGHT handed over but unwritten.
Across all uploads of one LocalStorage, at most UPLOAD_BUFFER bytes (64 MiB;
``LocalStorage(root, upload_buffer=...)``) are held accepted but unwritten,
plus what each upload's connection delivers before it is paused (one read).
Past it, every upload holding a partly filled batch hands it to its writer,
and every upload that sends more is asked to wait (``write`` returns a
Deferred) until the total has drained to half the budget.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import stat
import tempfile
import time
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, interfaces, threads
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from wsfiles import hashes
from wsfiles.names import MAX_PATH_DEPTH, is_valid_file_name, parent_of
from wsfiles.storage import (
    PARTIAL_FOLDER,
    TEMP_FOLDER,
    ChecksumMismatch,
    Entry,
    Exists,
    FileInfo,
    FolderInfo,
    IDownload,
    IFolder,
    IsAFolder,
    IStorage,
    IUpload,
    KnownDigest,
    NotAFolder,
    NotEmpty,
    NotFound,
    Precondition,
    PreconditionFailed,
    SmallFile,
    StorageFailure,
    SymlinkInPath,
    path_key,
)
from wsfiles.streaming import DOWNLOAD_FRAME, FileStreamer, StreamFailed

_log = Logger()


#: Entries a listing may gather on the reactor thread (a client's page);
#: larger reads (quota probes) and whole trees run in a thread.
_PAGE_ON_REACTOR = 1000

_OPEN_TO_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY


def _open_dir_nofollow(path: str, *, dir_fd: int | None = None) -> int:
    """Open a directory without following a symlink in its last component."""
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)


def _failure(e: OSError) -> StorageFailure:
    return StorageFailure(os.strerror(e.errno) if e.errno else str(e))


#: A resumable upload is fsynced (and its durable offset recorded) at least
#: this often, so a crash loses at most this much of it.
CHECKPOINT_BYTES = 32 * 1024 * 1024
#: Uploads reach the writer thread in batches of this size...
WRITE_BATCH = 1024 * 1024
#: ...and the sender is asked to wait while more than this is unwritten.
MAX_IN_FLIGHT = 8 * 1024 * 1024
#: The writer thread starts the write-back of what it has written every this
#: many bytes (Linux: sync_file_range), so the fsync before ``ack`` waits only
#: for the tail; 0 turns it off.  docs/performance.md, "Issue 18's levers".
WRITEBACK_EVERY = 8 * 1024 * 1024
#: All uploads of a LocalStorage together may hold this many bytes accepted
#: but not yet written (batches being filled plus batches handed to writers);
#: past it, uploads that send more wait until the total is half of it.
UPLOAD_BUFFER = 64 * 1024 * 1024
ANONYMOUS_PARTIALS = "@anonymous"  # '@' is not allowed in client names


class _UploadBudget:
    """Bytes accepted by the uploads of one storage but not yet written.

    Past ``limit`` the budget is *tight*: every upload's partly filled batch
    goes to its writer thread, and each upload that writes more hands over its
    own batch and gets a Deferred, fired once the total has drained to
    ``resume_at``.  While it is tight every byte counted is therefore queued
    for a writer thread, so the total drains without any client sending
    another byte, and no waiting upload can wait forever.
    """

    def __init__(self, limit: int) -> None:
        if limit < 0:
            raise ValueError(f"the upload buffer must be >= 0, not {limit}")
        self.limit = limit
        self.resume_at = limit // 2
        self.bytes = 0
        self.peak = 0
        #: Uploads holding a partly filled batch (a dict: insertion-ordered set).
        self.filling: dict[LocalUpload, None] = {}
        #: Uploads asked to wait, oldest first, with the Deferred they were given.
        self.waiting: dict[LocalUpload, Deferred] = {}

    def accepted(self, size: int) -> None:
        self.bytes += size
        if self.bytes > self.peak:
            self.peak = self.bytes

    @property
    def tight(self) -> bool:
        return self.bytes > self.limit or bool(self.waiting)

    def flush_all(self) -> None:
        """Hand every partly filled batch to its writer thread."""
        while self.filling:
            upload = next(iter(self.filling))
            upload._flush()  # removes it from self.filling
            self.filling.pop(upload, None)

    def wait(self, upload: LocalUpload) -> Deferred:
        waiter = self.waiting.get(upload)
        if waiter is None:
            waiter = self.waiting[upload] = Deferred()
        return waiter

    def written(self, size: int) -> None:
        """``size`` bytes were written or dropped; wake the waiting if drained."""
        self.bytes -= size
        if self.waiting and self.bytes <= self.resume_at:
            waiting, self.waiting = self.waiting, {}
            for waiter in waiting.values():
                waiter.callback(None)

    def forget(self, upload: LocalUpload, error: Exception | None = None) -> None:
        """``upload`` sends nothing more: let it go on (or fail) if it waits."""
        self.filling.pop(upload, None)
        waiter = self.waiting.pop(upload, None)
        if waiter is not None:
            if error is None:
                waiter.callback(None)
            else:
                waiter.errback(error)


@implementer(IStorage)
class LocalStorage:
    """Client folders on the local file system, under one root.

    ``upload_buffer`` bounds the bytes all uploads together hold accepted but
    not yet written (see UPLOAD_BUFFER).
    """

    def __init__(self, root: str, *, upload_buffer: int = UPLOAD_BUFFER) -> None:
        self._budget = _UploadBudget(upload_buffer)
        self.root = os.path.abspath(root)
        os.makedirs(self.root, exist_ok=True)
        self.temp_dir = os.path.join(self.root, TEMP_FOLDER)
        os.makedirs(self.temp_dir, exist_ok=True)
        self.partial_dir = os.path.join(self.root, PARTIAL_FOLDER)
        os.makedirs(self.partial_dir, exist_ok=True)
        #: Resumable uploads in flight, by partial path: a resume takes them over.
        self._resumable: dict[str, LocalUpload] = {}
        #: Partials being fsynced after an interruption: a resume waits for them.
        self._settling: dict[str, Deferred] = {}

    @property
    def upload_buffer(self) -> int:
        """The budget of bytes accepted by uploads but not yet written."""
        return self._budget.limit

    @property
    def buffered_bytes(self) -> int:
        """Bytes accepted by uploads but not yet written, all uploads together."""
        return self._budget.bytes

    @property
    def peak_buffered_bytes(self) -> int:
        """The most ``buffered_bytes`` has been since start-up."""
        return self._budget.peak

    def sweep_temporary_files(self) -> int:
        """Remove leftovers of plain uploads cut by a crash; return how many.

        Interrupted resumable uploads (``.wsfiles-partial/``) are kept for resuming.
        """
        removed = 0
        with os.scandir(self.temp_dir) as entries:
            for entry in entries:
                if entry.is_file(follow_symlinks=False) or entry.is_symlink():
                    os.unlink(entry.path)
                    removed += 1
        return removed

    def sweep_partials(self, max_age: float, now: float | None = None) -> int:
        """Remove interrupted resumable uploads idle for more than ``max_age`` s."""
        now = time.time() if now is None else now
        removed = 0
        for client_dir in os.scandir(self.partial_dir):
            if not client_dir.is_dir(follow_symlinks=False):
                continue
            for entry in os.scandir(client_dir.path):
                if not entry.name.endswith(".json"):
                    continue
                part = entry.path[: -len(".json")] + ".part"
                if part in self._resumable or part in self._settling:
                    continue
                try:
                    age = now - entry.stat(follow_symlinks=False).st_mtime
                except FileNotFoundError:
                    continue
                if age > max_age:
                    for path in (part, entry.path):
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(path)
                    removed += 1
        return removed

    def folder(self, client: str | None) -> LocalFolder:
        return LocalFolder(self, client)

    def free_bytes(self) -> float:
        try:
            st = os.statvfs(self.root)
        except OSError:
            return float("nan")
        return float(st.f_bavail * st.f_frsize)

    def check(self, min_free: int) -> Deferred:
        def probe() -> dict[str, Any]:
            if not os.path.isdir(self.root):
                raise StorageFailure(f"the root {self.root} is missing")
            os.listdir(self.root)
            fd, path = tempfile.mkstemp(prefix="health-", dir=self.temp_dir)
            try:
                os.write(fd, b"ok")
            finally:
                os.close(fd)
                os.unlink(path)
            free = self.free_bytes()
            if free < min_free:
                raise StorageFailure(f"disk nearly full: {int(free)} bytes free")
            return {"free_bytes": int(free)}

        try:
            return defer.succeed(probe())
        except StorageFailure as e:
            return defer.fail(e)
        except OSError as e:
            return defer.fail(StorageFailure(f"cannot use the root: {os.strerror(e.errno or 0)}"))


@implementer(IFolder)
class LocalFolder:
    """A client's folder; every path operation is relative to its directory fd.

    Names are single path segments (checked by wsfiles.names before they get
    here) and files are opened with O_NOFOLLOW, so nothing here can follow a
    symlink or lead outside the folder.
    """

    #: The hashes a transfer may ask for (each digest kept in its own xattr).
    accepted_hashes: tuple[str, ...] = hashes.KNOWN

    def __init__(self, storage: LocalStorage, client: str | None) -> None:
        self._storage = storage
        self._client = client

    def _open_folder(self) -> int:
        root_fd = os.open(self._storage.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        if self._client is None:
            return root_fd
        try:
            try:
                return _open_dir_nofollow(self._client, dir_fd=root_fd)
            except FileNotFoundError:
                # Two writer threads may commit a new client's first files at once.
                with contextlib.suppress(FileExistsError):
                    os.mkdir(self._client, 0o700, dir_fd=root_fd)
                return _open_dir_nofollow(self._client, dir_fd=root_fd)
        finally:
            os.close(root_fd)

    def _list_now(self) -> list[FileInfo]:
        fd = self._open_folder()
        try:
            files = []
            for name in os.listdir(fd):
                if not is_valid_file_name(name):  # one no command could address
                    continue
                try:
                    st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                except FileNotFoundError:
                    continue  # removed while we looked
                if stat.S_ISREG(st.st_mode):
                    files.append(FileInfo(name, st.st_size, st.st_mtime))
        finally:
            os.close(fd)
        files.sort(key=lambda info: info.name)
        return files

    def list(self) -> Deferred:
        return _guarded(self._list_now)

    # -- paths (protocol 1.2) ----------------------------------------------

    def _parent_and_leaf(self, path: str, *, create: bool = False) -> tuple[int, str]:
        """Open the folder holding ``path`` (the caller closes it) and name its leaf.

        Each segment is opened with O_NOFOLLOW | O_DIRECTORY from the one
        before: a symlink on the way is NotFound (never followed), a file on
        the way is NotAFolder.  With ``create``, missing folders are made.
        """
        *folders, leaf = path.split("/")
        folder_fd = self._open_folder()
        try:
            return _walk_to(folder_fd, folders, create=create), leaf
        finally:
            os.close(folder_fd)

    def _open_path_folder(self, path: str) -> int:
        """Open folder ``path`` ("" the top) for reading its entries."""
        folder_fd = self._open_folder()
        try:
            return _walk_to(folder_fd, path.split("/") if path else [], create=False)
        finally:
            os.close(folder_fd)

    def kind(self, path: str) -> Deferred:
        def kind_now() -> str | None:
            try:
                parent_fd, leaf = self._parent_and_leaf(path)
            except SymlinkInPath:
                raise
            except NotFound:
                return None  # a missing parent: nothing there yet (a save makes it)
            try:
                st = _lstat_or_none(leaf, parent_fd)
            finally:
                os.close(parent_fd)
            if st is None:
                return None
            if stat.S_ISDIR(st.st_mode):
                return "folder"
            return "file" if stat.S_ISREG(st.st_mode) else "other"

        return _guarded(kind_now)

    def entries(self, path: str, recursive: bool, after: str | None, limit: int) -> Deferred:
        def entries_now() -> list[Entry]:
            fd = self._open_path_folder(path)
            found: list[Entry] = []
            try:
                after_key = path_key(after) if after is not None else None
                depth = MAX_PATH_DEPTH - (path.count("/") + 1 if path else 0)
                _collect(fd, "", depth if recursive else 1, after_key, limit + 1, found)
            finally:
                os.close(fd)
            return found

        if recursive or limit > _PAGE_ON_REACTOR:  # a tree, or a big probe: off the reactor
            return _in_thread(entries_now)
        return _guarded(entries_now)

    def mkdir(self, path: str, parents: bool) -> Deferred:
        def mkdir_now() -> None:
            parent_fd, leaf = self._parent_and_leaf(path, create=parents)
            try:
                try:
                    os.mkdir(leaf, 0o700, dir_fd=parent_fd)
                except FileExistsError:
                    st = _lstat_or_none(leaf, parent_fd)
                    if parents and st is not None and stat.S_ISDIR(st.st_mode):
                        return
                    raise Exists(path) from None
                os.fsync(parent_fd)
            finally:
                os.close(parent_fd)

        return _guarded(mkdir_now)

    def rmdir(self, path: str, recursive: bool) -> Deferred:
        def rmdir_now() -> None:
            parent_fd, leaf = self._parent_and_leaf(path)
            try:
                st = _lstat_or_none(leaf, parent_fd)
                if st is None:
                    raise NotFound(path)
                if not stat.S_ISDIR(st.st_mode):
                    raise NotAFolder(path)
                if recursive:
                    _remove_tree(parent_fd, leaf)
                else:
                    try:
                        os.rmdir(leaf, dir_fd=parent_fd)
                    except OSError as e:
                        if e.errno == errno.ENOTEMPTY:
                            raise NotEmpty(path) from None
                        raise
                os.fsync(parent_fd)
            finally:
                os.close(parent_fd)

        return _in_thread(rmdir_now) if recursive else _guarded(rmdir_now)

    def usage(self) -> Deferred:
        def usage_now() -> tuple[int, int]:
            fd = self._open_folder()
            try:
                return _tree_usage(fd, MAX_PATH_DEPTH)
            finally:
                os.close(fd)

        return _in_thread(usage_now)  # a whole tree: off the reactor thread

    def _open_regular(self, name: str) -> tuple[int, os.stat_result]:
        folder_fd, leaf = self._parent_and_leaf(name)
        try:
            # O_NONBLOCK: opening a FIFO another program left here would
            # otherwise wait for a writer, on the reactor thread; O_NOCTTY: a
            # terminal device must not become ours.  Both are no-ops for the
            # regular files that pass the check below.
            fd = os.open(leaf, _OPEN_TO_READ, dir_fd=folder_fd)
        except (FileNotFoundError, NotADirectoryError):
            raise NotFound(name) from None
        except OSError as e:
            if e.errno == errno.ELOOP:  # a symlink: not ours to follow
                raise NotFound(name) from None
            raise
        finally:
            os.close(folder_fd)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise IsAFolder(name) if stat.S_ISDIR(st.st_mode) else NotFound(name)
        return fd, st

    def stat(self, name: str) -> Deferred:
        def stat_it() -> FileInfo:
            fd, st = self._open_regular(name)
            os.close(fd)
            return FileInfo(name, st.st_size, st.st_mtime)

        return _guarded(stat_it)

    def open_download(
        self, name: str, offset: int = 0, length: int | None = None, *, hash: str = hashes.SHA256
    ) -> Deferred:
        def open_it() -> LocalDownload:
            fd, st = self._open_regular(name)
            source = os.fdopen(fd, "rb", buffering=0)
            if offset > st.st_size:
                source.close()
                raise ValueError(f"offset {offset} is beyond the size {st.st_size}")
            if length is not None:  # a piece: hashed as it goes, no recorded digest
                return LocalDownload(source, st.st_size, offset, length)
            return LocalDownload(
                source, st.st_size, offset, digest=_recorded_digest(fd, st, hash), hash=hash, st=st
            )

        return _guarded(open_it)

    # -- uploads ---------------------------------------------------------

    def _partial_paths(self, name: str) -> tuple[str, str]:
        folder = os.path.join(self._storage.partial_dir, self._client or ANONYMOUS_PARTIALS)
        key = hashlib.sha256(name.encode("utf-8")).hexdigest()
        return os.path.join(folder, key + ".part"), os.path.join(folder, key + ".json")

    def begin_upload(
        self,
        name: str,
        size: int,
        sha256: str | None = None,
        resume: bool = False,
        *,
        mtime: float | None = None,
        precondition: Precondition | None = None,
        hash: str = hashes.SHA256,
    ) -> Deferred:
        if not resume:

            def begin() -> LocalUpload:
                fd, temp_path = tempfile.mkstemp(prefix="upload-", dir=self._storage.temp_dir)
                return LocalUpload(self, name, size, sha256, fd, temp_path, hash=hash)

            d = _guarded(begin)
        else:
            d = Deferred.fromCoroutine(self._begin_resumable(name, size, sha256, hash))

        def settings(upload: LocalUpload) -> LocalUpload:
            upload.mtime, upload.precondition = mtime, precondition
            return upload

        return d.addCallback(settings)

    async def _begin_resumable(
        self, name: str, size: int, sha256: str | None, hash: str
    ) -> LocalUpload:
        part, meta = self._partial_paths(name)
        earlier = self._storage._resumable.get(part)
        if earlier is not None:
            # The same client resumes while its earlier attempt still looks
            # alive (its dead connection not yet noticed): take it over.
            await earlier.interrupt()
            earlier.superseded()
        settling = self._storage._settling.get(part)
        if settling is not None:
            waiter: Deferred = Deferred()
            settling.addBoth(lambda result: (waiter.callback(None), result)[1])
            await waiter
        try:
            fd, offset, digest = await threads.deferToThread(
                self._open_partial, name, size, sha256, part, meta, hash
            )
        except OSError as e:
            raise _failure(e) from e
        upload = LocalUpload(
            self, name, size, sha256, fd, part, meta=meta, offset=offset, hash=hash
        )
        upload._hash = digest
        return upload

    def _open_partial(
        self, name: str, size: int, sha256: str | None, part: str, meta: str, hash: str
    ) -> tuple[int, int, Any]:
        """Reopen a matching partial at its durable offset, or start a new one (thread).

        A partial matches when its size, declared digest and hash are this
        upload's; the hash state cannot be saved, so the kept bytes are hashed
        again here."""
        os.makedirs(os.path.dirname(part), mode=0o700, exist_ok=True)
        record = _read_meta(meta)
        offset = 0
        if (
            record is not None
            and record.get("size") == size
            and record.get("sha256") == sha256
            and record.get("hash", hashes.SHA256) == hash
        ):
            durable = record.get("durable")
            offset = min(durable, size) if isinstance(durable, int) and durable > 0 else 0
        fd = os.open(part, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            if os.fstat(fd).st_size < offset:
                offset = 0  # the record claims more than the file holds
            os.ftruncate(fd, offset)
            digest = _hash_fd_prefix(fd, offset, hash)
            os.lseek(fd, offset, os.SEEK_SET)
            _write_meta(
                meta,
                {"name": name, "size": size, "sha256": sha256, "hash": hash, "durable": offset},
            )
        except BaseException:
            os.close(fd)
            raise
        return fd, offset, digest

    def partial_bytes(self) -> Deferred:
        def scan() -> dict[str, int]:
            folder = os.path.join(self._storage.partial_dir, self._client or ANONYMOUS_PARTIALS)
            found: dict[str, int] = {}
            if not os.path.isdir(folder):
                return found
            for entry in os.scandir(folder):
                if entry.name.endswith(".json"):
                    record = _read_meta(entry.path)
                    part = entry.path[: -len(".json")] + ".part"
                    with contextlib.suppress(FileNotFoundError):
                        if record is not None:
                            found[record["name"]] = os.stat(part).st_size
            return found

        return _guarded(scan)

    # -- file management ---------------------------------------------------

    def delete(self, name: str, precondition: Precondition | None = None) -> Deferred:
        def delete_it() -> None:
            folder_fd, leaf = self._parent_and_leaf(name)
            try:
                st = _lstat_or_none(leaf, folder_fd)
                if st is not None and stat.S_ISDIR(st.st_mode):
                    raise IsAFolder(name)
                if st is None or not stat.S_ISREG(st.st_mode):
                    raise NotFound(name)
                if precondition is not None and not precondition.holds(
                    _stored_digest(folder_fd, leaf)
                ):
                    raise PreconditionFailed(name)
                os.unlink(leaf, dir_fd=folder_fd)
            finally:
                os.close(folder_fd)

        # With a precondition the file may need hashing: not on the reactor.
        return _guarded(delete_it) if precondition is None else _in_thread(delete_it)

    def write_files(self, files: list[SmallFile]) -> Deferred:
        """One thread job for them all, in phases: write every temporary file,
        fsync them all (the first fsync commits the journal for the rest),
        rename them all, then fsync each folder once.  Each file is durable
        and in place when this fires, as after its own ``save``, for a
        fraction of the system calls and thread hand-offs."""

        def write_now() -> list[str | Exception]:
            outcomes: list[str | Exception | None] = [None] * len(files)
            folders: dict[str, int] = {}
            written: list[tuple[int, str, int, str]] = []  # (index, temporary path, fd, digest)
            try:
                for index, file in enumerate(files):
                    try:
                        written.append((index, *self._write_temporary(file, folders)))
                    except (*_REFUSALS, ChecksumMismatch, OSError) as e:
                        outcomes[index] = e
                for index, path, fd, _ in written:
                    try:
                        os.fsync(fd)
                    except OSError as e:
                        outcomes[index] = e
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(path)
                    finally:
                        os.close(fd)
                renamed: dict[str, list[int]] = {}
                for index, path, _, digest in written:
                    if outcomes[index] is not None:
                        continue  # (its fsync failed: removed above)
                    file = files[index]
                    folder = parent_of(file.name)
                    try:
                        leaf = file.name.rpartition("/")[2]
                        _put_in_place(path, folders[folder], leaf, file.name, file.precondition)
                    except (PreconditionFailed, OSError) as e:
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(path)
                        outcomes[index] = e
                        continue
                    outcomes[index] = digest
                    renamed.setdefault(folder, []).append(index)
                for folder, indexes in renamed.items():
                    try:
                        os.fsync(folders[folder])  # make the renames durable
                    except OSError as e:
                        for index in indexes:
                            outcomes[index] = e
            finally:
                for fd in folders.values():
                    os.close(fd)
            return [
                _failure(outcome) if isinstance(outcome, OSError) else outcome
                for outcome in outcomes
            ]  # type: ignore[misc]

        return _threaded(write_now)

    def _write_temporary(self, file: SmallFile, folders: dict[str, int]) -> tuple[str, int, str]:
        """Check ``file`` and write it to a temporary file, not yet fsynced
        (thread): (its path, its open fd, its SHA-256).  ``folders`` keeps
        the fds of the folders opened (made) on the way."""
        digest = hashlib.sha256(file.data).hexdigest()
        if file.sha256 is not None and digest != file.sha256.lower():
            raise ChecksumMismatch(f"the data's SHA-256 is {digest}")
        folder = parent_of(file.name)
        if folder not in folders:
            folders[folder] = self._parent_and_leaf(file.name, create=True)[0]
        st = _lstat_or_none(file.name.rpartition("/")[2], folders[folder])
        if st is not None and stat.S_ISDIR(st.st_mode):
            raise IsAFolder(file.name)
        fd, path = tempfile.mkstemp(prefix="upload-", dir=self._storage.temp_dir)
        try:
            view = memoryview(file.data)
            while view:
                view = view[os.write(fd, view) :]
            _record_digest(fd, digest, hashes.SHA256, file.mtime)
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        return path, fd, digest

    def described(self, paths: list[str]) -> Deferred:
        def describe() -> dict[str, FileInfo]:
            by_folder: dict[str, list[str]] = {}  # each folder is walked to once
            for path in paths:
                by_folder.setdefault(parent_of(path), []).append(path)
            found = {}
            for folder, members in by_folder.items():
                try:
                    folder_fd = self._open_path_folder(folder)
                except (NotFound, NotAFolder):
                    continue  # gone since it was listed
                try:
                    for path in members:
                        info = _describe(folder_fd, path)
                        if info is not None:
                            found[path] = info
                finally:
                    os.close(folder_fd)
            return found

        return _in_thread(describe)

    def rename(self, name: str, to: str, overwrite: bool) -> Deferred:
        def rename_it() -> None:
            source_fd, leaf = self._parent_and_leaf(name)
            try:
                st = _lstat_or_none(leaf, source_fd)
                is_folder = st is not None and stat.S_ISDIR(st.st_mode)
                if st is None or not (is_folder or stat.S_ISREG(st.st_mode)):
                    raise NotFound(name)
                if name == to:
                    return
                # The source exists: only now may missing parents of ``to`` be made.
                target_fd, to_leaf = self._parent_and_leaf(to, create=True)
                try:
                    target = _lstat_or_none(to_leaf, target_fd)
                    if target is not None and (is_folder or not stat.S_ISREG(target.st_mode)):
                        raise Exists(to)  # a folder replaces nothing; nothing replaces a folder
                    if overwrite and not is_folder:
                        os.rename(leaf, to_leaf, src_dir_fd=source_fd, dst_dir_fd=target_fd)
                    else:
                        _rename_noreplace(source_fd, leaf, target_fd, to_leaf, is_folder)
                    os.fsync(target_fd)
                finally:
                    os.close(target_fd)
                os.fsync(source_fd)
            finally:
                os.close(source_fd)

        return _guarded(rename_it)


_RENAME_NOREPLACE = 1


_SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start write-back, do not wait


def _find_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except Exception:  # not Linux (or no C library to ask): fdatasync, or nothing
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_sync_file_range = _find_sync_file_range()


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing ``length`` bytes at ``offset`` to disk, without waiting
    (thread).  Where sync_file_range is missing, fdatasync: it waits, but the
    final fsync then has only the tail left."""
    if _sync_file_range is None:
        fdatasync = getattr(os, "fdatasync", None)  # absent on macOS
        if fdatasync is not None:
            fdatasync(fd)
        return
    if _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE) != 0:
        error = ctypes.get_errno()
        if error in (errno.ENOSYS, errno.EINVAL, errno.ESPIPE):
            return  # not supported here: the final fsync does it all
        raise OSError(error, os.strerror(error))


def _rename_noreplace(
    source_fd: int, name: str, target_fd: int, to: str, is_folder: bool = False
) -> None:
    """Rename unless ``to`` exists, atomically: renameat2(RENAME_NOREPLACE).

    Where the kernel or file system lacks it: for a file, link() (which
    refuses an existing target) then unlink(), so for a moment both names
    exist; for a folder, a check then rename(2).
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        renameat2 = None
    if renameat2 is not None:
        result = renameat2(source_fd, name.encode(), target_fd, to.encode(), _RENAME_NOREPLACE)
        if result == 0:
            return
        error = ctypes.get_errno()
        if error == errno.EEXIST:
            raise Exists(to)
        if error not in (errno.EINVAL, errno.ENOSYS):
            raise OSError(error, os.strerror(error))
    if is_folder:
        if _lstat_or_none(to, target_fd) is not None:
            raise Exists(to)
        os.rename(name, to, src_dir_fd=source_fd, dst_dir_fd=target_fd)
        return
    try:
        os.link(name, to, src_dir_fd=source_fd, dst_dir_fd=target_fd, follow_symlinks=False)
    except FileExistsError:
        raise Exists(to) from None
    os.unlink(name, dir_fd=source_fd)


def _walk_to(folder_fd: int, segments: list[str], *, create: bool) -> int:
    """Open the folder ``segments`` below ``folder_fd``, one O_NOFOLLOW step at a time."""
    fd = os.dup(folder_fd)
    try:
        for depth, segment in enumerate(segments, 1):
            walked = "/".join(segments[:depth])  # what the refusal names
            try:
                next_fd = _open_dir_nofollow(segment, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise NotFound(walked) from None
                with contextlib.suppress(FileExistsError):
                    os.mkdir(segment, 0o700, dir_fd=fd)
                next_fd = _open_dir_nofollow(segment, dir_fd=fd)
            except NotADirectoryError:
                # O_DIRECTORY answers ENOTDIR for a symlink too: tell them apart.
                st = _lstat_or_none(segment, fd)
                if st is not None and stat.S_ISLNK(st.st_mode):
                    raise SymlinkInPath(walked) from None  # never followed
                raise NotAFolder(walked) from None
            except OSError as e:
                if e.errno == errno.ELOOP:  # a symlink: never followed
                    raise SymlinkInPath(walked) from None
                raise
            os.close(fd)
            fd = next_fd
    except BaseException:
        os.close(fd)
        raise
    return fd


def _visible_names(fd: int) -> list[str]:
    """The names in folder ``fd`` a command could address, sorted."""
    return sorted(name for name in os.listdir(fd) if is_valid_file_name(name))


def _collect(
    fd: int,
    prefix: str,
    depth: int,
    after: tuple[str, ...] | None,
    wanted: int,
    found: list[Entry],
) -> None:
    """Append to ``found`` the entries below folder ``fd``, depth first, that come
    after ``after``, until there are ``wanted``; ``depth`` levels at most."""
    for name in _visible_names(fd):
        if len(found) >= wanted:
            return
        relative = prefix + name
        key = path_key(relative)
        inside = after is not None and after[: len(key)] == key  # the cursor is below it
        if after is not None and not key > after and not inside:
            continue  # it and all below it came before the cursor
        try:
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            continue  # removed while we looked
        is_folder = stat.S_ISDIR(st.st_mode)
        if not (is_folder or stat.S_ISREG(st.st_mode)):
            continue  # symlinks and special files are never listed
        if after is None or key > after:
            if is_folder:
                found.append(FolderInfo(relative, st.st_mtime))
            else:
                found.append(FileInfo(relative, st.st_size, st.st_mtime))
        if is_folder and depth > 1:
            try:
                sub = _open_dir_nofollow(name, dir_fd=fd)
            except OSError:
                continue  # replaced meanwhile
            try:
                _collect(sub, relative + "/", depth - 1, after if inside else None, wanted, found)
            finally:
                os.close(sub)


def _tree_usage(fd: int, depth: int) -> tuple[int, int]:
    """(bytes of files, files and folders) below folder ``fd``."""
    size = count = 0
    for name in _visible_names(fd):
        try:
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            continue
        if stat.S_ISREG(st.st_mode):
            size, count = size + st.st_size, count + 1
        elif stat.S_ISDIR(st.st_mode):
            count += 1
            if depth > 1:
                try:
                    sub = _open_dir_nofollow(name, dir_fd=fd)
                except OSError:
                    continue
                try:
                    sub_size, sub_count = _tree_usage(sub, depth - 1)
                finally:
                    os.close(sub)
                size, count = size + sub_size, count + sub_count
    return size, count


def _remove_tree(parent_fd: int, name: str) -> None:
    """Remove folder ``name`` and everything in it, never following a symlink."""
    fd = _open_dir_nofollow(name, dir_fd=parent_fd)
    try:
        for entry in os.listdir(fd):
            st = _lstat_or_none(entry, fd)
            if st is None:
                continue
            if stat.S_ISDIR(st.st_mode):
                _remove_tree(fd, entry)
            else:
                os.unlink(entry, dir_fd=fd)  # a symlink itself, never its target
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=parent_fd)


def _hash_fd_prefix(fd: int, length: int, hash: str = hashes.SHA256) -> Any:
    """A hash object (SHA-256 unless ``hash`` names another) fed with the first
    ``length`` bytes of ``fd`` (blocking)."""
    digest = hashes.new(hash)
    position = 0
    while position < length:
        chunk = os.pread(fd, min(1 << 20, length - position), position)
        if not chunk:
            raise StorageFailure("the file shrank while it was read")
        digest.update(chunk)
        position += len(chunk)
    return digest


def _lstat_or_none(name: str, folder_fd: int) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=folder_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _read_meta(path: str) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _write_meta(path: str, record: dict[str, Any]) -> None:
    """Replace a partial's record durably (write, fsync, rename)."""
    temp = path + ".new"
    with open(temp, "w", encoding="utf-8") as f:
        json.dump(record, f)
        f.flush()
        os.fsync(f.fileno())
    os.rename(temp, path)


#: What file-system operations raise that is the caller's to answer.
_REFUSALS = (NotFound, Exists, NotAFolder, IsAFolder, NotEmpty, PreconditionFailed, ValueError)


def _guarded(operation: Callable[[], object]) -> Deferred:
    """Run a quick file-system operation now; OSErrors become StorageFailure."""
    try:
        return defer.succeed(operation())
    except _REFUSALS as e:
        return defer.fail(e)
    except OSError as e:
        _log.warn("storage operation failed: {error}", error=e)
        return defer.fail(_failure(e))


#: Whole-tree operations (recursive listings and removals, quota walks) run in
#: Twisted's shared thread pool, which also writes uploads and checks tokens:
#: at most this many at once, so clients removing huge trees cannot take it all.
TREE_OPERATIONS_AT_ONCE = 2
_tree_slots = defer.DeferredSemaphore(TREE_OPERATIONS_AT_ONCE)


def _in_thread(operation: Callable[[], object]) -> Deferred:
    """``_guarded`` for a long operation (a whole tree): in a thread, a few at once."""
    return _tree_slots.run(threads.deferToThread, operation).addErrback(_refused_or_failed)


def _threaded(operation: Callable[[], object]) -> Deferred:
    """``_guarded`` for a blocking operation on one file (fsync): in a thread."""
    return threads.deferToThread(operation).addErrback(_refused_or_failed)


def _refused_or_failed(failure: Failure) -> Failure:
    """A thread's failure as the caller expects it: refusals as they are,
    OSErrors as StorageFailure (logged)."""
    if failure.check(*_REFUSALS, ChecksumMismatch):
        return failure
    if failure.check(OSError) is not None:
        _log.warn("storage operation failed: {error}", error=failure.value)
        return Failure(_failure(failure.value))
    return failure


@implementer(IUpload)
class LocalUpload:
    """An upload streamed into ``ROOT/.wsfiles-tmp`` and renamed into place.

    A plain upload uses a throw-away temp file.  A resumable one uses a
    partial file under ``ROOT/.wsfiles-partial/CLIENT/`` with a JSON record of
    its size, hash and durable offset, fsynced every CHECKPOINT_BYTES and
    when cut.

    Writing and hashing run in a thread, in batches of WRITE_BATCH bytes, one
    step at a time in order (hashlib and os.write release the GIL), so the
    reactor thread only parses frames; past MAX_IN_FLIGHT unwritten bytes,
    ``write`` asks the sender to wait, as it does while the storage-wide
    budget (UPLOAD_BUFFER) is exceeded.  fsync and rename run there too.
    """

    def __init__(
        self,
        folder: LocalFolder,
        name: str,
        size: int,
        sha256: str | None,
        fd: int,
        path: str,
        *,
        meta: str | None = None,
        offset: int = 0,
        hash: str = hashes.SHA256,
    ) -> None:
        self._folder = folder
        self._algorithm = hash
        self._name = name
        self._size = size
        self._expected = sha256
        self._fd: int | None = fd
        self._path = path
        self._meta = meta
        self.offset = offset
        self._accepted = offset  # bytes given to write()
        self._stored = offset  # bytes the thread has written
        self._written_back = offset  # bytes whose write-back has started
        self._checkpointed = offset
        self._batch: list[bytes] = []
        self._batch_bytes = 0
        self._in_flight = 0
        self._error: StorageFailure | None = None
        self._drained: Deferred | None = None
        self.mtime: float | None = None
        self.precondition: Precondition | None = None
        self._hash = hashes.new(hash)
        self._budget = folder._storage._budget
        self._steps: Deferred = defer.succeed(None)
        self.on_superseded: Callable[[], None] | None = None
        if meta is not None:
            folder._storage._resumable[path] = self

    @property
    def resumable(self) -> bool:
        return self._meta is not None

    # -- writing -------------------------------------------------------------

    def write(self, data: bytes) -> Deferred | None:
        if self._error is not None:
            raise self._error
        if self._fd is None:
            raise StorageFailure("the upload is closed")
        budget = self._budget
        self._batch.append(data)
        self._batch_bytes += len(data)
        self._accepted += len(data)
        budget.accepted(len(data))
        if self._batch_bytes >= WRITE_BATCH:
            self._flush()
        else:
            budget.filling[self] = None
        if self.resumable and self._accepted - self._checkpointed >= CHECKPOINT_BYTES:
            self._checkpointed = self._accepted
            self._flush()
            self._step(self._checkpoint)
        tight = budget.tight
        if tight:
            # Everything counted must be on its way to disk, this batch too,
            # or a waiting upload could wait for bytes nobody will write.
            budget.flush_all()
        if self._in_flight > MAX_IN_FLIGHT:
            if self._drained is None:
                self._drained = Deferred()
            return self._drained
        if tight:
            return budget.wait(self)
        return None

    def _flush(self) -> None:
        """Hand the batch to the writer thread."""
        self._budget.filling.pop(self, None)
        if not self._batch:
            return
        batch, size = self._batch, self._batch_bytes
        self._batch, self._batch_bytes = [], 0
        self._in_flight += size
        d = self._step(self._write_batch, batch)
        d.addCallbacks(lambda _: self._written(size), self._write_failed)
        d.addBoth(lambda _: self._budget.written(size))

    def _write_batch(self, batch: list[bytes]) -> None:
        """Write and hash one batch (thread)."""
        fd = self._fd
        if fd is None or self._error is not None:
            return
        for chunk in batch:
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view) :]
            self._hash.update(chunk)
            self._stored += len(chunk)
        if WRITEBACK_EVERY and self._stored - self._written_back >= WRITEBACK_EVERY:
            _start_writeback(fd, self._written_back, self._stored - self._written_back)
            self._written_back = self._stored

    def _written(self, size: int) -> None:
        self._in_flight -= size
        if self._drained is not None and self._in_flight <= MAX_IN_FLIGHT // 2:
            drained, self._drained = self._drained, None
            drained.callback(None)

    def _write_failed(self, failure: Failure) -> None:
        error = failure.value
        self._error = _failure(error) if isinstance(error, OSError) else StorageFailure(str(error))
        if self._drained is not None:
            drained, self._drained = self._drained, None
            drained.errback(self._error)
        self._budget.forget(self, self._error)

    def _step(self, work: Callable[..., Any], *args: Any) -> Deferred:
        """Run ``work`` in a thread after the steps before it."""
        self._steps.addCallback(lambda _: threads.deferToThread(work, *args))
        result: Deferred = Deferred()

        def done(value: Any) -> None:
            result.callback(value)

        def failed(failure: Any) -> None:
            result.errback(failure)

        self._steps.addCallbacks(done, failed)
        return result

    # -- durability ----------------------------------------------------------

    def _checkpoint(self) -> None:
        """fsync the bytes written so far and record them as durable (thread)."""
        fd, meta = self._fd, self._meta
        if fd is None or meta is None:
            return
        os.fsync(fd)
        _write_meta(
            meta,
            {
                "name": self._name,
                "size": self._size,
                "sha256": self._expected,
                "hash": self._algorithm,
                "durable": self._stored,
            },
        )

    def _finish(self) -> str:
        """Check the hash, fsync, close, and rename over the target (thread)."""
        if self._error is not None:
            raise self._error
        digest = self._hash.hexdigest()
        if self._expected is not None and digest != self._expected.lower():
            raise ChecksumMismatch(f"the data's {hashes.label(self._algorithm)} is {digest}")
        fd, self._fd = self._fd, None
        assert fd is not None
        try:
            _make_durable(fd, digest, self._algorithm, self.mtime)
        finally:
            os.close(fd)
        folder_fd, leaf = self._folder._parent_and_leaf(self._name, create=True)
        try:
            _put_in_place(self._path, folder_fd, leaf, self._name, self.precondition)
            os.fsync(folder_fd)  # make the rename itself durable
        finally:
            os.close(folder_fd)
        if self._meta is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._meta)
        return digest

    def commit(self) -> Deferred:
        self._release()
        self._flush()
        self._budget.forget(self)
        d = self._step(self._finish)

        def failed(failure: Failure) -> Any:
            self._discard()
            if failure.check(OSError):
                raise _failure(failure.value)
            return failure

        d.addErrback(failed)
        if self.resumable:
            # A resume (or the sweeper) must not touch the partial while it is
            # being fsynced and renamed into place.
            self._settle(d)
        return d

    def _settle(self, d: Deferred) -> None:
        settling = self._folder._storage._settling
        settling[self._path] = d

        def settled(result: Any) -> Any:
            if settling.get(self._path) is d:
                del settling[self._path]
            return result

        d.addBoth(settled)

    def interrupt(self) -> Deferred:
        if not self.resumable:
            self.abort()
            return defer.succeed(None)
        self._release()
        self._flush()
        self._budget.forget(self)
        d = self._step(self._checkpoint)
        d.addBoth(self._close_after)
        self._settle(d)
        return d

    def _close_after(self, result: Any) -> Any:
        self._close_fd()
        if not isinstance(result, Failure):
            return result
        _log.warn("could not keep an interrupted upload: {error}", error=result.value)
        return None

    def superseded(self) -> None:
        if self.on_superseded is not None:
            self.on_superseded()

    def abort(self) -> None:
        self._release()
        dropped = self._batch_bytes
        self._batch, self._batch_bytes = [], 0
        self._budget.forget(self)
        self._discard()
        self._budget.written(dropped)

    def _discard(self) -> None:
        """Remove the files now; close the descriptor once the writer is done with it.

        Unlinking a file a thread still writes to is fine on POSIX: the bytes
        go to an inode that no name reaches and that vanishes on close.
        """
        self._error = self._error or StorageFailure("the upload was aborted")
        for path in (self._path, self._meta):
            if path is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        self._steps.addBoth(lambda _: self._close_fd())

    def _close_fd(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _release(self) -> None:
        """No longer the in-flight upload of its partial."""
        if self._folder._storage._resumable.get(self._path) is self:
            del self._folder._storage._resumable[self._path]


def _remember_digest(
    fd: int, digest: str, hash: str = hashes.SHA256, unchanged_since: os.stat_result | None = None
) -> None:
    """Record the SHA-256 (or ``hash``'s digest, in its own attribute) of the
    file just written, with its size and mtime.

    A download then sends the recorded hash instead of hashing the file
    again (SHA-256 is half of a download's CPU).  The record is trusted only
    while the file's size, mtime and inode are those recorded, when the
    download starts and again when its last byte is out: a file changed in
    any ordinary way is hashed again, and one changed during a download
    fails that download (``storage_error``).  On filesystems whose mtime is
    coarse (1 s), a same-size rewrite within the same second would keep the
    record; ext4, XFS and btrfs keep nanoseconds.  One changed in place
    with its mtime forged back goes out under the old hash, and the client,
    which always hashes what it receives, reports ``checksum_mismatch``
    (docs/protocol.md).  Where the filesystem has no user xattrs, nothing is
    recorded and downloads hash as before.

    The record ("HEX SIZE MTIME_NS INODE") is in ``hashes.xattr(hash)``.
    ``unchanged_since``: a digest computed by reading the file is recorded
    only if the file is still as it was then.
    """
    identity = _identity(os.fstat(fd))
    if unchanged_since is not None and identity != _identity(unchanged_since):
        return  # changed while it was read: the digest is of neither version
    with contextlib.suppress(OSError):  # ENOTSUP, EPERM, ENOSPC: hash on download instead
        os.setxattr(fd, hashes.xattr(hash), f"{digest} {identity}".encode())


def _make_durable(fd: int, digest: str, hash: str, mtime: float | None) -> None:
    """Give a written file its mtime and digest record, then fsync it (thread)."""
    _record_digest(fd, digest, hash, mtime)
    os.fsync(fd)


def _record_digest(fd: int, digest: str, hash: str, mtime: float | None) -> None:
    """Give a written file its mtime, then its digest record (which names the mtime)."""
    if mtime is not None:
        mtime_ns = round(mtime * 1e9)
        os.utime(fd, ns=(mtime_ns, mtime_ns))
    # Only this hash's record: a BLAKE3 upload leaves SHA-256 to be computed
    # (and recorded) when something first needs it.
    _remember_digest(fd, digest, hash)


def _put_in_place(
    path: str, folder_fd: int, leaf: str, name: str, precondition: Precondition | None
) -> None:
    """Rename the finished file ``path`` over ``leaf`` if ``precondition`` still
    holds: "absent" atomically (no-replace rename), a digest just before."""
    if precondition is not None and precondition.absent:
        temp_fd = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY)
        try:
            _rename_noreplace(temp_fd, os.path.basename(path), folder_fd, leaf)
        except Exists:
            raise PreconditionFailed(name) from None
        finally:
            os.close(temp_fd)
        return
    if precondition is not None and not precondition.holds(_stored_digest(folder_fd, leaf)):
        raise PreconditionFailed(name)
    os.rename(path, leaf, dst_dir_fd=folder_fd)


def _hash_and_remember(fd: int, st: os.stat_result) -> str:
    """Hash a stored file that has no valid record (another program wrote it,
    or it was changed) and record the digest for the next time (blocking)."""
    digest = _hash_fd_prefix(fd, st.st_size).hexdigest()
    _remember_digest(fd, digest, unchanged_since=st)
    return digest


def _describe(folder_fd: int, path: str) -> FileInfo | None:
    """The regular file ``path`` (whose folder is ``folder_fd``) with its SHA-256;
    None if it is gone or no longer a regular file."""
    try:
        fd = os.open(path.rpartition("/")[2], _OPEN_TO_READ, dir_fd=folder_fd)
    except OSError:
        return None  # gone, or a symlink: never ours
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        digest = _recorded_digest(fd, st) or _hash_and_remember(fd, st)
        return FileInfo(path, st.st_size, st.st_mtime, digest)
    finally:
        os.close(fd)


def _stored_digest(folder_fd: int, leaf: str) -> str | None:
    """The SHA-256 of the regular file ``leaf`` in ``folder_fd``; None when there
    is none (a folder or a special file is not a file to compare with)."""
    info = _describe(folder_fd, leaf)
    return None if info is None else info.sha256


def _identity(st: os.stat_result) -> str:
    """What must not change for a recorded digest to hold: size, mtime, inode
    (a copy that kept the attribute is hashed again)."""
    return f"{st.st_size} {st.st_mtime_ns} {st.st_ino}"


def _recorded_digest(fd: int, st: os.stat_result, hash: str = hashes.SHA256) -> str | None:
    """The SHA-256 (or ``hash``'s digest) recorded for the file open as
    ``fd``, if it still holds."""
    try:
        digest, identity = os.getxattr(fd, hashes.xattr(hash)).decode("ascii").split(" ", 1)
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if identity != _identity(st) or not hashes.is_digest(hash, digest):
        return None
    return digest


@implementer(IDownload)
class LocalDownload(FileStreamer):
    """A file opened for reading from ``offset``, streamed by FileStreamer."""

    def __init__(
        self,
        source: Any,
        size: int,
        offset: int = 0,
        length: int | None = None,
        *,
        digest: str | None = None,
        hash: str = hashes.SHA256,
        st: os.stat_result | None = None,
    ) -> None:
        source.seek(offset)
        self.length = size - offset if length is None else min(length, size - offset)
        super().__init__(source, self.length, DOWNLOAD_FRAME)
        self.size = size
        self.offset = offset
        self._digest = digest  # recorded digest of ``hash``, when valid
        self._algorithm = hash
        self._opened = st  # a whole file's stat when opened: its digest may be recorded

    def stream_to(self, consumer: interfaces.IConsumer, sha256: Any = None) -> Deferred:
        if sha256 is not None:
            self.sha256 = sha256  # hashed in the reading thread
        done = super().stream_to(consumer)
        if self._digest is not None:
            done.addCallback(self._still_recorded)
        elif self._opened is not None and self.length == self.size:
            done.addCallback(self._remember)
        return done

    def _still_recorded(self, result: None) -> None:
        """The recorded digest goes out only if the file did not change meanwhile."""
        assert self._digest is not None
        fd = self._source.fileno()
        if _recorded_digest(fd, os.fstat(fd), self._algorithm) is None:
            raise StreamFailed("the file changed while it was being sent")
        return result

    def _remember(self, result: None) -> None:
        """A whole file hashed as it went out (no valid record: another program
        wrote it, or it was uploaded with another hash): record the digest,
        unless the file changed meanwhile, so the next download, ETag or
        listing needs no hashing.  One xattr write, like the check above."""
        assert self._opened is not None
        fd, digest = self._source.fileno(), self.sha256.hexdigest()
        _remember_digest(fd, digest, self._algorithm, unchanged_since=self._opened)
        return result

    def prefix_sha256(self) -> Deferred:
        """Hash bytes [0, offset) in a thread (a resumed download's first part);
        with a recorded digest, no hashing at all (KnownDigest).  The hash is
        the one the download was opened for (SHA-256 unless asked otherwise)."""
        if self._digest is not None:
            return defer.succeed(KnownDigest(self._digest))
        if self.offset == 0:
            return defer.succeed(hashes.new(self._algorithm))
        return threads.deferToThread(
            _hash_fd_prefix, self._source.fileno(), self.offset, self._algorithm
        )

    def close(self) -> None:
        self._source.close()
