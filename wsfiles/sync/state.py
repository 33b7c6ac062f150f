"""The sync state: what both sides held when each path was last in sync.

Kept in SQLite (stdlib ``sqlite3``) at ``LOCAL/.wsfiles-sync/state.sqlite3`` so the
next run can tell a delete or a rename from a new file.  One state belongs to one
pairing (server URL, remote folder): syncing the same local folder against another
server or folder would read those deletes wrongly, so :meth:`SyncState.open` refuses
it with :class:`StateMismatch` unless the caller asks for ``reset`` (which forgets
every row, so the next plan copies and never deletes).

Crash safety: WAL journal with ``synchronous=FULL``; every :meth:`~SyncState.record`
(or every :meth:`~SyncState.batch`) is one committed transaction, so a crash loses
at most the rows not yet committed.  A lost row is harmless: the next plan finds the
same content on both sides and only records it again (see :mod:`wsfiles.sync.plan`).

Partial downloads live in ``LOCAL/.wsfiles-sync/partial/`` (:func:`partial_path`);
the runner renames one over its target only once its SHA-256 is verified.

A lock (``flock`` on ``LOCAL/.wsfiles-sync/lock``) keeps two sync processes off the
same local folder: the second gets :class:`StateLocked`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from wsfiles.sync.model import Synced

#: The state folder at the sync root; never synced, never scanned.
STATE_DIR = ".wsfiles-sync"
STATE_FILE = "state.sqlite3"
PARTIAL_DIR = "partial"
LOCK_FILE = "lock"
SCHEMA_VERSION = "1"


class StateError(Exception):
    """A state the sync cannot use; ``str()`` is one line for the CLI, ``code`` is stable."""

    code = "state_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class StateMismatch(StateError):
    """This local folder was synced with another server URL or remote folder."""

    code = "state_mismatch"


class StateLocked(StateError):
    """Another sync process holds this local folder."""

    code = "state_locked"


def state_dir(local_dir: str | os.PathLike[str]) -> Path:
    """``LOCAL/.wsfiles-sync``."""
    return Path(local_dir) / STATE_DIR


def partial_dir(local_dir: str | os.PathLike[str]) -> Path:
    """``LOCAL/.wsfiles-sync/partial``: where downloads stay until verified."""
    return state_dir(local_dir) / PARTIAL_DIR


def partial_path(local_dir: str | os.PathLike[str], path: str) -> Path:
    """The partial-download file for remote ``path``.

    Named by the SHA-256 of the path, so any path (deep, long, odd characters)
    maps to one short flat name, and the same path resumes into the same file
    on the next run.  The folder is created if missing.
    """
    folder = partial_dir(local_dir)
    folder.mkdir(parents=True, exist_ok=True)
    return folder / hashlib.sha256(path.encode("utf-8")).hexdigest()


def pairing_url(url: str) -> str:
    """``url`` as stored in the state: without credentials, query or fragment
    (never write a secret to disk) and without a trailing slash."""
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme.lower(), netloc.lower(), parts.path.rstrip("/"), "", ""))


def _describe(url: str, path: str) -> str:
    return f"{url} folder {path!r}" if path else f"{url} (top folder)"


class SyncState:
    """The state rows of one local folder, for one (server URL, remote folder) pairing."""

    def __init__(
        self, local_dir: str | os.PathLike[str], connection: sqlite3.Connection, lock_fd: int
    ) -> None:
        """Use :meth:`open`; this takes an already locked folder and open database."""
        self.local_dir = Path(local_dir)
        self._db = connection
        self._lock_fd: int | None = lock_fd
        self._batch_depth = 0

    @classmethod
    def open(
        cls,
        local_dir: str | os.PathLike[str],
        url: str,
        path: str = "",
        *,
        reset: bool = False,
    ) -> SyncState:
        """Open (or create) the state of ``local_dir`` for ``url`` + remote ``path``.

        Raises :class:`StateMismatch` if the state belongs to another pairing and
        ``reset`` is false; with ``reset`` every row is forgotten and the new
        pairing stored.  Raises :class:`StateLocked` if another process syncs
        this folder, :class:`StateError` if the file is not a usable state.
        """
        folder = state_dir(local_dir)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StateError(f"cannot create {folder}: {e.strerror}") from None
        lock_fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock_fd)
            raise StateLocked(f"another wsfiles sync is running on {local_dir}") from None
        try:
            try:
                db = cls._connect(folder / STATE_FILE)
            except StateError:
                if not reset:
                    raise
                # reset starts over even from a file that is not a database.
                for suffix in ("", "-wal", "-shm"):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(folder / (STATE_FILE + suffix))
                db = cls._connect(folder / STATE_FILE)
        except BaseException:
            os.close(lock_fd)
            raise
        state = cls(local_dir, db, lock_fd)
        try:
            state._pair(pairing_url(url), path, reset=reset)
        except BaseException:
            state.close()
            raise
        return state

    @staticmethod
    def _connect(file: Path) -> sqlite3.Connection:
        db: sqlite3.Connection | None = None
        try:
            # isolation_level=None: transactions are explicit (BEGIN/COMMIT below).
            db = sqlite3.connect(file, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
            db.execute(
                "CREATE TABLE IF NOT EXISTS files ("
                " path TEXT PRIMARY KEY, size INTEGER NOT NULL, sha256 TEXT NOT NULL,"
                " local_mtime_ns INTEGER NOT NULL, local_inode INTEGER NOT NULL,"
                " remote_mtime REAL NOT NULL)"
            )
        except sqlite3.DatabaseError as e:
            if db is not None:
                db.close()
            raise StateError(
                f"{file} is not a usable sync state ({e}): reset the state to start over"
            ) from None
        return db

    def _pair(self, url: str, path: str, *, reset: bool) -> None:
        meta = dict(self._db.execute("SELECT key, value FROM meta").fetchall())
        version = meta.get("version")
        if version is not None and version != SCHEMA_VERSION:
            raise StateError(
                f"{self.local_dir}: sync state version {version} is not known to this "
                "wsfiles (reset the state to start over)"
            )
        stored = (meta.get("url"), meta.get("path"))
        if stored == (url, path) and not reset:
            return
        if stored != (None, None) and not reset:
            raise StateMismatch(
                f"{self.local_dir} is synced with {_describe(stored[0] or '', stored[1] or '')},"
                f" not {_describe(url, path)}: reset its sync state to pair it anew"
            )
        with self._transaction():
            self._db.execute("DELETE FROM files")
            self._db.execute("DELETE FROM meta")
            self._db.executemany(
                "INSERT INTO meta (key, value) VALUES (?, ?)",
                [("version", SCHEMA_VERSION), ("url", url), ("path", path)],
            )

    @property
    def url(self) -> str:
        """The server URL this state is paired with (as stored)."""
        return self._meta("url")

    @property
    def remote_path(self) -> str:
        """The remote folder this state is paired with (``""`` = top folder)."""
        return self._meta("path")

    def _meta(self, key: str) -> str:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else ""

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        if self._batch_depth:
            yield
            return
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Group many changes in one transaction (one fsync instead of one each).

        Nothing in the batch is committed if it raises.  Nested batches join
        the outer one.
        """
        with self._transaction():
            self._batch_depth += 1
            try:
                yield
            finally:
                self._batch_depth -= 1

    def all(self) -> dict[str, Synced]:
        """Every state row, by path."""
        rows = self._db.execute(
            "SELECT path, size, sha256, local_mtime_ns, local_inode, remote_mtime FROM files"
        ).fetchall()
        return {row[0]: Synced(*row) for row in rows}

    def get(self, path: str) -> Synced | None:
        """The state row of ``path``, if any."""
        row = self._db.execute(
            "SELECT path, size, sha256, local_mtime_ns, local_inode, remote_mtime"
            " FROM files WHERE path = ?",
            (path,),
        ).fetchone()
        return Synced(*row) if row else None

    def record(self, synced: Synced) -> None:
        """Remember that both sides hold ``synced`` at its path (replaces any row)."""
        with self._transaction():
            self._db.execute(
                "INSERT OR REPLACE INTO files"
                " (path, size, sha256, local_mtime_ns, local_inode, remote_mtime)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (
                    synced.path,
                    synced.size,
                    synced.sha256,
                    synced.local_mtime_ns,
                    synced.local_inode,
                    synced.remote_mtime,
                ),
            )

    def forget(self, path: str) -> None:
        """Drop the row of ``path`` (deleted on both sides)."""
        with self._transaction():
            self._db.execute("DELETE FROM files WHERE path = ?", (path,))

    def rename(self, path: str, to: str) -> None:
        """Move the row of ``path`` to ``to`` (renamed on both sides); replaces a row at ``to``."""
        with self._transaction():
            self._db.execute("DELETE FROM files WHERE path = ?", (to,))
            self._db.execute("UPDATE files SET path = ? WHERE path = ?", (to, path))

    def close(self) -> None:
        """Close the database and release the lock (idempotent)."""
        if self._lock_fd is None:
            return
        try:
            self._db.close()
        finally:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> SyncState:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
