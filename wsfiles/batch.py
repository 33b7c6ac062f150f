"""``save_batch`` (protocol 1.2): many small files in one command and one message.

A ``save`` costs a round trip and a commit (fsync, rename) in turn, so
10,000 files of 4 KiB spend their time waiting, not working.  A batch names
up to MAX_BATCH_FILES files, their bytes come back to back in one binary
message, and files whose bytes are in are stored in chunks (write all,
fsync all, rename all, fsync each folder once), each with its own outcome:
one file refused (``conflict``, ``is_a_folder``...) does not undo the others.

Plain objects: the session parses the command with ``parse_batch`` and
feeds the message to a ``BatchUpload``, which it treats like any upload.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from wsfiles import errors
from wsfiles.errors import ProtocolError
from wsfiles.fields import count_field, mtime_field, precondition_field, sha256_field
from wsfiles.folders import refusal
from wsfiles.storage import (
    ChecksumMismatch,
    IFolder,
    Precondition,
    SmallFile,
    StorageFailure,
)

_log = Logger()

#: Files in one batch at most.
MAX_BATCH_FILES = 1000
#: A batched file's size at most: bigger files go by ``save`` (resumable).
MAX_BATCH_FILE = 1024 * 1024
#: Files handed to the storage together (``IFolder.write_files``: on local
#: folders one thread job that writes them all, fsyncs them all, renames them
#: all and fsyncs each folder once), or fewer that hold CHUNK_BYTES.
CHUNK_FILES = 64
CHUNK_BYTES = 4 * 1024 * 1024
#: ``write_files`` calls of one batch under way at once; past them the
#: session stops reading the file channel.
CHUNKS_AT_ONCE = 2


@dataclass(frozen=True)
class BatchEntry:
    """One file of a batch, as the command declared it."""

    name: str
    size: int
    sha256: str | None = None
    mtime: float | None = None
    precondition: Precondition | None = None


def parse_batch(
    message: dict[str, Any], check_name: Callable[[object], str], max_size: int
) -> list[BatchEntry]:
    """The batch's files, every field checked; anything wrong refuses the whole
    batch before a byte is sent (nothing stored)."""
    files = message.get("files")
    if not isinstance(files, list) or not 1 <= len(files) <= MAX_BATCH_FILES:
        raise ProtocolError(
            errors.BAD_REQUEST, f"'files' must be a list of 1 to {MAX_BATCH_FILES} files"
        )
    entries: list[BatchEntry] = []
    names: set[str] = set()
    for item in files:
        if not isinstance(item, dict):
            raise ProtocolError(errors.BAD_REQUEST, "each of 'files' must be an object")
        name = check_name(item.get("name"))
        if name in names:
            raise ProtocolError(errors.BAD_REQUEST, f"{name!r} is in the batch twice")
        names.add(name)
        size = count_field(item, "size")
        limit = min(max_size, MAX_BATCH_FILE)
        if size > limit:
            raise ProtocolError(
                errors.TOO_LARGE,
                f"{name!r}: {size} bytes is over a batched file's limit of {limit}"
                " (save it on its own)",
            )
        entries.append(
            BatchEntry(name, size, sha256_field(item), mtime_field(item), precondition_field(item))
        )
    return entries


def _outcome(file: SmallFile, outcome: str | BaseException) -> dict[str, Any]:
    """A file's entry in the ``saved`` reply."""
    if isinstance(outcome, str):
        saved: dict[str, Any] = {"name": file.name, "size": len(file.data), "sha256": outcome}
        if file.mtime is not None:
            saved["mtime"] = file.mtime
        return saved
    refused = refusal(outcome, file.name)
    if refused is not None:
        code, text = refused.code, refused.message
    elif isinstance(outcome, ChecksumMismatch):
        code, text = errors.CHECKSUM_MISMATCH, f"{outcome}, not the declared one"
    elif isinstance(outcome, ProtocolError):
        code, text = outcome.code, outcome.message
    elif isinstance(outcome, StorageFailure):
        code, text = errors.STORAGE_ERROR, str(outcome)
    else:
        code, text = errors.INTERNAL_ERROR, "internal error (logged)"
    return {"name": file.name, "error": code, "message": text}


class BatchUpload:
    """The upload a ``save_batch`` feeds its message to.

    It looks like one IUpload to the session (``write``, ``commit``,
    ``abort``...).  Files whose bytes are all in are stored together with
    ``folder.write_files``, CHUNK_FILES (or CHUNK_BYTES) at a time and
    CHUNKS_AT_ONCE calls at once; ``commit`` fires with the ``saved``
    reply's list.  A batch cut short keeps the files stored before the cut
    (each was saved atomically on its own); the others are not stored.
    """

    offset = 0

    def __init__(self, folder: IFolder, entries: list[BatchEntry]) -> None:
        self._folder = folder
        self._entries = entries
        self._index = 0
        self._pieces: list[bytes] = []
        self._filled = 0
        self._ready: list[SmallFile] = []
        self._ready_bytes = 0
        self._stores: list[Deferred] = []
        self._running = 0
        self._room: Deferred | None = None
        self.on_superseded: Callable[[], None] | None = None

    def begin(self) -> None:
        """Every check passed and the client is told to send: files of 0 bytes
        at the start have nothing to wait for."""
        self._take_empty_files()

    @property
    def size(self) -> int:
        return sum(entry.size for entry in self._entries)

    def write(self, data: bytes) -> Deferred | None:
        view = memoryview(data)
        while view:
            if self._index >= len(self._entries):
                raise StorageFailure("more bytes than the batch's files declare")
            entry = self._entries[self._index]
            take = min(len(view), entry.size - self._filled)
            self._pieces.append(bytes(view[:take]))
            self._filled += take
            view = view[take:]
            if self._filled == entry.size:
                self._file_complete()
        if self._running >= CHUNKS_AT_ONCE:
            if self._room is None:
                self._room = Deferred()
            return self._room  # the session stops reading until a store ends
        return None

    def _file_complete(self) -> None:
        entry = self._entries[self._index]
        data = b"".join(self._pieces)
        self._pieces, self._filled = [], 0
        self._index += 1
        self._ready.append(
            SmallFile(entry.name, data, entry.sha256, entry.mtime, entry.precondition)
        )
        self._ready_bytes += len(data)
        if len(self._ready) >= CHUNK_FILES or self._ready_bytes >= CHUNK_BYTES:
            self._store_ready()
        self._take_empty_files()

    def _take_empty_files(self) -> None:
        """Files of 0 bytes have no bytes to wait for: they are complete now."""
        while self._index < len(self._entries) and self._entries[self._index].size == 0:
            self._file_complete()

    def _store_ready(self) -> None:
        files, self._ready, self._ready_bytes = self._ready, [], 0
        if files:
            self._stores.append(Deferred.fromCoroutine(self._store(files)))

    async def _store(self, files: list[SmallFile]) -> list[dict[str, Any]]:
        self._running += 1
        outcomes: list[Any]
        try:
            outcomes = await self._folder.write_files(files)
        except (StorageFailure, ProtocolError) as e:
            outcomes = [e] * len(files)
        except Exception as e:
            _log.failure("storing {count} files of a batch", count=len(files))
            outcomes = [e] * len(files)
        finally:
            self._running -= 1
            room, self._room = self._room, None
            if room is not None:
                room.callback(None)
        return [_outcome(file, outcome) for file, outcome in zip(files, outcomes, strict=True)]

    def commit(self) -> Deferred:
        """Fire with one outcome per file, in the batch's order, once all are stored."""

        async def all_stored() -> list[dict[str, Any]]:
            if self._index < len(self._entries):
                self.abort()
                raise StorageFailure("the batch's message ended before its last file")
            self._store_ready()
            chunks = await defer.gatherResults(self._stores, consumeErrors=True)
            return [outcome for chunk in chunks for outcome in chunk]

        return Deferred.fromCoroutine(all_stored())

    async def settle(self) -> int:
        """Wait for the stores under way (after a cut); how many files were stored."""
        chunks = await defer.gatherResults(self._stores, consumeErrors=True)
        return sum(1 for chunk in chunks for outcome in chunk if "error" not in outcome)

    def interrupt(self) -> Deferred:
        self.abort()
        return defer.succeed(None)

    def abort(self) -> None:
        """The message was cut: files not yet handed to the storage are not stored."""
        self._pieces, self._ready, self._ready_bytes = [], [], 0
