"""The storage boundary: an interface, and the local-folder implementation.

Protocols and command handling only ever talk to ``IStorage`` and the
objects it hands out, so another backend (an object store, say) can be
added without touching them.  Every operation that may wait returns a
Deferred; the local backend answers cheap ones at once and moves
``fsync`` and ``rename`` to a thread so a slow disk never stalls the reactor.

Local layout (see docs/protocol.md):

- ``ROOT`` is the anonymous client's folder; ``ROOT/NAME`` is client NAME's.
- ``ROOT/.wsfiles-tmp/`` holds uploads in progress.  No valid file name can
  reach it (names starting with ``.wsfiles-`` are reserved), it is never
  listed, and it is emptied at start-up.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

from twisted.internet import defer, interfaces, threads
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import Attribute, Interface, implementer

from wsfiles.names import RESERVED_PREFIX
from wsfiles.streaming import FileStreamer

TEMP_FOLDER = ".wsfiles-tmp"

_log = Logger()


@dataclass(frozen=True)
class FileInfo:
    """One entry of a listing, as the protocol sends it."""

    name: str
    size: int
    mtime: float

    def as_json(self) -> dict[str, object]:
        return {"name": self.name, "size": self.size, "mtime": self.mtime}


class NotFound(Exception):
    """No regular file by that name in the client's folder."""


class StorageFailure(Exception):
    """The backend could not do what was asked (disk full, permissions...)."""


class IDownload(Interface):
    """An opened file, ready to be streamed to a consumer."""

    size = Attribute("The number of bytes the stream will deliver.")

    def stream_to(consumer: interfaces.IConsumer) -> Deferred:
        """Write the file to ``consumer``, honouring its flow control.

        Fires with None once every byte was written, or fails with
        StreamFailed.  The caller must call ``close`` afterwards.
        """

    def stop() -> None:
        """Stop streaming (the consumer went away); the Deferred fails."""

    def close() -> None:
        """Release the underlying file."""


class IUpload(Interface):
    """A file being written; invisible to listings until committed."""

    def write(data: bytes) -> None:
        """Append ``data``; raise StorageFailure if it cannot be stored."""

    def commit() -> Deferred:
        """Make the file durable and visible under its name, atomically."""

    def abort() -> None:
        """Throw the upload away; the previous file of that name is untouched."""


class IFolder(Interface):
    """One client's folder."""

    def list() -> Deferred:
        """Fire with a list of FileInfo for regular files, sorted by name."""

    def open_download(name: str) -> Deferred:
        """Fire with an IDownload, or fail with NotFound."""

    def exists(name: str) -> Deferred:
        """Fire with True when ``name`` is a regular file in the folder."""

    def begin_upload(name: str, size: int) -> Deferred:
        """Fire with an IUpload that will become ``name`` on commit."""


class IStorage(Interface):
    """Where the files of every client live."""

    def folder(client: str | None) -> IFolder:
        """The folder of ``client``; None is the anonymous client."""


def _open_dir_nofollow(path: str, *, dir_fd: int | None = None) -> int:
    """Open a directory without following a symlink in its last component."""
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)


@implementer(IStorage)
class LocalStorage:
    """Client folders on the local file system, under one root."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        os.makedirs(self.root, exist_ok=True)
        self.temp_dir = os.path.join(self.root, TEMP_FOLDER)
        os.makedirs(self.temp_dir, exist_ok=True)

    def sweep_temporary_files(self) -> int:
        """Remove leftovers of uploads cut by a crash; return how many."""
        removed = 0
        with os.scandir(self.temp_dir) as entries:
            for entry in entries:
                if entry.is_file(follow_symlinks=False) or entry.is_symlink():
                    os.unlink(entry.path)
                    removed += 1
        return removed

    def folder(self, client: str | None) -> LocalFolder:
        return LocalFolder(self, client)


@implementer(IFolder)
class LocalFolder:
    """A client's folder; every path operation is relative to its directory fd.

    Names are single path segments (checked by wsfiles.names before they get
    here) and files are opened with O_NOFOLLOW, so nothing here can follow a
    symlink or lead outside the folder.
    """

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
                os.mkdir(self._client, 0o700, dir_fd=root_fd)
                return _open_dir_nofollow(self._client, dir_fd=root_fd)
        finally:
            os.close(root_fd)

    def _list_now(self) -> list[FileInfo]:
        fd = self._open_folder()
        try:
            files = []
            for name in os.listdir(fd):
                try:
                    st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                except FileNotFoundError:
                    continue  # removed while we looked
                if stat.S_ISREG(st.st_mode) and _listable(name):
                    files.append(FileInfo(name, st.st_size, st.st_mtime))
        finally:
            os.close(fd)
        files.sort(key=lambda info: info.name)
        return files

    def list(self) -> Deferred:
        return _guarded(self._list_now)

    def _open_regular(self, name: str) -> tuple[int, int]:
        folder_fd = self._open_folder()
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=folder_fd)
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
            raise NotFound(name)
        return fd, st.st_size

    def exists(self, name: str) -> Deferred:
        def check() -> bool:
            try:
                fd, _ = self._open_regular(name)
            except NotFound:
                return False
            os.close(fd)
            return True

        return _guarded(check)

    def open_download(self, name: str) -> Deferred:
        def open_it() -> LocalDownload:
            fd, size = self._open_regular(name)
            return LocalDownload(os.fdopen(fd, "rb", buffering=0), size)

        return _guarded(open_it)

    def begin_upload(self, name: str, size: int) -> Deferred:
        def begin() -> LocalUpload:
            fd, temp_name = tempfile.mkstemp(prefix="upload-", dir=self._storage.temp_dir)
            return LocalUpload(self, name, fd, temp_name)

        return _guarded(begin)


def _listable(name: str) -> bool:
    """Only names a client could have created are listed."""
    if name.startswith(RESERVED_PREFIX):
        return False
    try:
        name.encode("utf-8")  # undecodable bytes arrive as lone surrogates
    except UnicodeEncodeError:
        return False
    return True


def _guarded(operation: Callable[[], object]) -> Deferred:
    """Run a quick file-system operation now; OSErrors become StorageFailure."""
    try:
        return defer.succeed(operation())
    except NotFound as e:
        return defer.fail(e)
    except OSError as e:
        _log.warn("storage operation failed: {error}", error=e)
        return defer.fail(StorageFailure(os.strerror(e.errno) if e.errno else str(e)))


@implementer(IUpload)
class LocalUpload:
    """An upload streamed into ``ROOT/.wsfiles-tmp`` and renamed into place."""

    def __init__(self, folder: LocalFolder, name: str, fd: int, temp_path: str) -> None:
        self._folder = folder
        self._name = name
        self._fd: int | None = fd
        self._temp_path = temp_path

    def write(self, data: bytes) -> None:
        if self._fd is None:
            raise StorageFailure("the upload is closed")
        view = memoryview(data)
        try:
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
        except OSError as e:
            raise StorageFailure(os.strerror(e.errno) if e.errno else str(e)) from e

    def _finish(self) -> None:
        """fsync, close, and rename over the target (run in a thread)."""
        fd, self._fd = self._fd, None
        assert fd is not None
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        folder_fd = self._folder._open_folder()
        try:
            os.rename(self._temp_path, self._name, dst_dir_fd=folder_fd)
            os.fsync(folder_fd)  # make the rename itself durable
        finally:
            os.close(folder_fd)

    def commit(self) -> Deferred:
        d = threads.deferToThread(self._finish)

        def failed(failure):
            self._remove_temp()
            if failure.check(OSError):
                e = failure.value
                raise StorageFailure(os.strerror(e.errno) if e.errno else str(e))
            return failure

        return d.addErrback(failed)

    def abort(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._remove_temp()

    def _remove_temp(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._temp_path)


@implementer(IDownload)
class LocalDownload(FileStreamer):
    """A file opened for reading, streamed by FileStreamer."""

    def close(self) -> None:
        self._source.close()
