"""The storage boundary: the interface every backend implements.

Protocols and command handling only ever talk to ``IStorage`` and the
objects it hands out, so a backend fits without touching them: local folders
(wsfiles/storage/local.py) and an S3-compatible object store
(wsfiles/storage/s3.py).  Every operation that may wait returns a Deferred.
Names are protocol 1.2 paths (``a/b/c``), already checked by wsfiles.names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twisted.internet import interfaces
from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

TEMP_FOLDER = ".wsfiles-tmp"
PARTIAL_FOLDER = ".wsfiles-partial"


@dataclass(frozen=True)
class FileInfo:
    """One entry of a listing, as the protocol sends it."""

    name: str
    size: int
    mtime: float
    sha256: str | None = None  # only where asked for (a listing with "sha256": true)

    def as_json(self) -> dict[str, object]:
        return {"name": self.name, "size": self.size, "mtime": self.mtime}

    def as_entry(self) -> dict[str, object]:
        """A protocol 1.2 listing entry."""
        entry: dict[str, object] = {
            "name": self.name,
            "type": "file",
            "size": self.size,
            "mtime": self.mtime,
        }
        if self.sha256 is not None:
            entry["sha256"] = self.sha256
        return entry


@dataclass(frozen=True)
class FolderInfo:
    """A folder in a protocol 1.2 listing."""

    name: str
    mtime: float

    def as_entry(self) -> dict[str, object]:
        return {"name": self.name, "type": "folder", "mtime": self.mtime}


Entry = FileInfo | FolderInfo


def path_key(path: str) -> tuple[str, ...]:
    """Sort key of the recursive listing order: depth-first, each folder before its
    contents, siblings in code-point order ("a", "a/b", "a-c")."""
    return tuple(path.split("/"))


class NotFound(Exception):
    """No regular file by that name in the client's folder."""


class SymlinkInPath(NotFound):
    """A path goes through a symlink: never followed, so nothing is there."""


class NotAFolder(Exception):
    """A path goes through, or names, a file where a folder is needed."""


class IsAFolder(Exception):
    """A path names a folder where a file is needed."""


class NotEmpty(Exception):
    """A folder to remove still has entries (and ``recursive`` was not asked)."""


class Exists(Exception):
    """The target name is taken (a rename without overwrite)."""


class StorageFailure(Exception):
    """The backend could not do what was asked (disk full, permissions...)."""


class ChecksumMismatch(Exception):
    """The upload's SHA-256 is not the one the client declared."""


class PreconditionFailed(Exception):
    """A save or delete asked for a file that is no longer what is stored
    (``if_sha256``), or for no file where there now is one (``if_absent``)."""


@dataclass(frozen=True)
class Precondition:
    """What must be stored at a name for a save or delete to go ahead: a file
    with SHA-256 ``sha256``, or (``absent``) nothing.  Sync clients use it so
    that a change made meanwhile by someone else is never overwritten."""

    sha256: str | None = None
    absent: bool = False

    def holds(self, stored: str | None) -> bool:
        """Whether a stored file of SHA-256 ``stored`` (None: no file) satisfies it."""
        if self.absent:
            return stored is None
        return self.sha256 is None or stored == self.sha256


@dataclass(frozen=True)
class SmallFile:
    """A file for ``IFolder.write_files``: its bytes, and what a ``save`` asks."""

    name: str
    data: bytes
    sha256: str | None = None
    mtime: float | None = None
    precondition: Precondition | None = None


class KnownDigest:
    """Stands in for a hashlib object when a stored file's SHA-256 is
    recorded (``IDownload.prefix_sha256`` of a whole file may give one):
    ``update`` does nothing and ``hexdigest`` gives the record."""

    def __init__(self, digest: str) -> None:
        self._digest = digest

    def update(self, data: bytes) -> None:
        pass

    def hexdigest(self) -> str:
        return self._digest


class IDownload(Interface):
    """An opened file, ready to be streamed to a consumer."""

    size = Attribute("The file's total size.")
    offset = Attribute("Where the stream starts.")
    length = Attribute("How many bytes it delivers: size - offset, or fewer when asked.")

    def prefix_sha256() -> Deferred:
        """Fire with a hashlib object fed with bytes [0, offset)."""

    def stream_to(consumer: interfaces.IConsumer, sha256: Any) -> Deferred:
        """Write bytes [offset, size) to ``consumer``, honouring its flow control,
        and feed them to the hash object ``sha256``.

        Fires with None once every byte was written, or fails with
        StreamFailed.  The caller must call ``close`` afterwards.
        """

    def stop() -> None:
        """Stop streaming (the consumer went away); the Deferred fails."""

    def close() -> None:
        """Release the underlying file."""


class IUpload(Interface):
    """A file being written; invisible to listings until committed."""

    offset = Attribute("Bytes already stored by an earlier, resumed attempt.")

    def write(data: bytes) -> Deferred | None:
        """Append ``data``; raise StorageFailure if it cannot be stored.

        None means "stored, send more". A Deferred means the backend is busy
        (an object store uploading a part): the caller stops reading until
        it fires, and fails the upload if it fails.
        """

    def commit() -> Deferred:
        """Make the file durable and visible under its name, atomically.

        Fires with the hex SHA-256 of the whole file; fails with
        ChecksumMismatch (and removes the upload) if a declared hash differs.
        """

    def interrupt() -> Deferred:
        """The transfer was cut: keep what arrived if resumable, else abort."""

    def abort() -> None:
        """Throw the upload away; the previous file of that name is untouched."""

    on_superseded = Attribute(
        "Called with no arguments when a resumed upload of the same name takes"
        " this one over; set by the caller."
    )


class IFolder(Interface):
    """One client's folder."""

    accepted_hashes = Attribute(
        "The whole-file hashes (wsfiles.hashes names) that begin_upload and"
        " open_download take as ``hash``; a backend without the attribute takes"
        " SHA-256 only and is never passed ``hash``."
    )

    def list() -> Deferred:
        """Fire with a list of FileInfo for regular files, sorted by name."""

    def stat(name: str) -> Deferred:
        """Fire with the FileInfo of ``name``, or fail with NotFound."""

    def open_download(name: str, offset: int = 0, length: int | None = None) -> Deferred:
        """Fire with an IDownload of bytes [offset, offset + length) (to the end
        when ``length`` is None or reaches past it), or fail with NotFound.
        A backend with ``accepted_hashes`` also takes ``hash=NAME``: the
        download's ``prefix_sha256`` then gives that hash's object."""

    def begin_upload(
        name: str,
        size: int,
        sha256: str | None = None,
        resume: bool = False,
        *,
        mtime: float | None = None,
        precondition: Precondition | None = None,
    ) -> Deferred:
        """Fire with an IUpload that will become ``name`` on commit.

        With ``resume``, an interrupted resumable upload of ``name`` with the
        same size and hash carries on from its durable offset.  ``mtime``
        becomes the stored file's modification time; ``precondition`` is
        checked again at commit, just before the file appears (the commit
        then fails with PreconditionFailed and stores nothing).  A backend
        with ``accepted_hashes`` also takes ``hash=NAME``: the upload is then
        hashed with that hash, ``sha256`` is the digest declared for it, and
        commit fires with its digest.
        """

    def write_files(files: list[SmallFile]) -> Deferred:
        """Store small files whose bytes are all in memory, each as
        ``begin_upload`` + ``write`` + ``commit`` would (atomic, durable when
        this fires, the same refusals), together (``save_batch``): fire with
        one outcome per file, in order: its SHA-256, or the exception that
        refused it (IsAFolder, NotAFolder, PreconditionFailed,
        ChecksumMismatch, StorageFailure)."""

    def partial_bytes() -> Deferred:
        """Fire with {name: bytes} kept for this client's interrupted uploads."""

    def delete(name: str, precondition: Precondition | None = None) -> Deferred:
        """Remove ``name``; fail with NotFound, or PreconditionFailed when the
        file stored is not the one ``precondition`` names."""

    def described(paths: list[str]) -> Deferred:
        """Fire with {path: FileInfo with its sha256} for the files among
        ``paths`` (those gone since are left out).  A digest recorded when the
        file was stored is used; a file without one is hashed (and, where the
        backend can, recorded for next time)."""

    def rename(name: str, to: str, overwrite: bool) -> Deferred:
        """Rename a file or a folder, creating missing parents of ``to``; fail
        with NotFound, or Exists unless ``overwrite`` (a folder never replaces
        anything, and nothing replaces a folder)."""

    def kind(path: str) -> Deferred:
        """Fire with "file", "folder" or None; fail with NotAFolder when a
        parent on the way is a file."""

    def entries(path: str, recursive: bool, after: str | None, limit: int) -> Deferred:
        """Fire with up to ``limit`` + 1 entries of folder ``path`` ("" the
        top) whose names (paths relative to it, when ``recursive``) come after
        ``after`` in ``path_key`` order; fail with NotFound or NotAFolder."""

    def mkdir(path: str, parents: bool) -> Deferred:
        """Create folder ``path``; fail with Exists (unless ``parents`` and it is a
        folder), NotFound (a parent missing, without ``parents``), NotAFolder."""

    def rmdir(path: str, recursive: bool) -> Deferred:
        """Remove folder ``path``; fail with NotFound, NotAFolder, or NotEmpty."""

    def usage() -> Deferred:
        """Fire with (bytes, entries) of the whole tree: every file's size, and
        files and folders counted (quotas count the whole tree)."""


class IStorage(Interface):
    """Where the files of every client live."""

    def folder(client: str | None) -> IFolder:
        """The folder of ``client``; None is the anonymous client."""

    def check(min_free: int) -> Deferred:
        """Fire with details when files can be listed and written, with at least
        ``min_free`` bytes free; fail with StorageFailure saying why not."""

    def free_bytes() -> float:
        """Bytes free for new files (NaN when unknown)."""
