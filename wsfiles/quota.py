"""Per-client quotas, counting uploads in flight and interrupted ones kept for resuming.

A save reserves its full declared size from ``ready`` until it ends, so a
client with one byte left cannot start a terabyte upload.  Replacing a file
counts only the difference.  Reservations are per client, across all of its
connections.
"""

from __future__ import annotations

import contextlib
import json
from collections import Counter
from collections.abc import Callable, Iterable

from wsfiles import errors
from wsfiles.errors import ProtocolError
from wsfiles.names import parent_of
from wsfiles.storage import FileInfo, IFolder, IsAFolder, NotAFolder, NotFound
from wsfiles.users import NO_QUOTA


async def bytes_kept(folder: IFolder, name: str | None) -> int:
    """Bytes the folder's whole tree holds (files and kept partials) that a save of
    ``name`` keeps: what it replaces and its own partial are not counted (None:
    a batch, which subtracts nothing)."""
    used, _ = await folder.usage()
    partials = await folder.partial_bytes()
    replaced = 0
    if name is not None:
        partials.pop(name, None)  # a resumed upload's own bytes are in its size
        with contextlib.suppress(NotFound, NotAFolder, IsAFolder):
            replaced = (await folder.stat(name)).size
    return used + sum(partials.values()) - replaced


class Reservation:
    """Bytes held for one upload; released exactly once."""

    def __init__(self, ledger: QuotaLedger, client: str, size: int) -> None:
        self._ledger = ledger
        self._client = client
        self.size = size

    def release(self) -> None:
        if self.size:
            self._ledger._reserved[self._client] -= self.size
            self.size = 0


class QuotaLedger:
    def __init__(self, default: int | None, override: Callable[[str], int | None]) -> None:
        self.default = default
        self._override = override
        self._reserved: Counter[str] = Counter()

    def quota_of(self, client: str) -> int | None:
        """Bytes allowed, or None for unlimited."""
        override = self._override(client)
        if override is None:
            return self.default
        return None if override == NO_QUOTA else override

    def reserved(self, client: str) -> int:
        return self._reserved[client]

    async def check(self, client: str, folder: IFolder, name: str, size: int) -> None:
        """Raise quota_exceeded if saving ``size`` more bytes as ``name`` would not fit."""
        await self._fits(client, folder, name, size)

    async def reserve(
        self, client: str, folder: IFolder, name: str | None, size: int
    ) -> Reservation:
        """Hold ``size`` bytes, then check (others may have saved meanwhile).

        Holding first keeps two concurrent reservations from both fitting.
        """
        self._reserved[client] += size
        reservation = Reservation(self, client, size)
        try:
            await self._fits(client, folder, name, 0)
        except BaseException:
            reservation.release()
            raise
        return reservation

    async def _fits(self, client: str, folder: IFolder, name: str | None, extra: int) -> None:
        quota = self.quota_of(client)
        if quota is None:
            return
        needed = await bytes_kept(folder, name) + self._reserved[client] + extra
        if needed > quota:
            raise ProtocolError(
                errors.QUOTA_EXCEEDED,
                f"this save needs {needed} bytes of a {quota}-byte quota",
            )


#: Entries of a folder read to check its listing's length; beyond them it is
#: long anyway (1.2 clients page it; a 1.1 listing this long is refused).
_LISTING_PROBE = 200_000
#: Bytes a listing entry adds besides its name (JSON keys, size, mtime).
_ENTRY_OVERHEAD = len(json.dumps(FileInfo("", 2**40, 1.7e9 + 0.123456).as_json()).encode()) + 2


def listing_bytes(names: Iterable[str]) -> int:
    """An upper bound on the bytes a ``list`` reply's entries take for these names."""
    return sum(len(json.dumps(name).encode()) + _ENTRY_OVERHEAD for name in names)


async def _missing_folders(folder: IFolder, path: str) -> int:
    """How many folders above ``path`` do not exist yet (a save or move makes them)."""
    missing, parent = 0, parent_of(path)
    while parent and await folder.kind(parent) is None:  # bounded by the path's depth
        missing += 1
        parent = parent_of(parent)
    return missing


class EntryLimits:
    """How many files a folder may hold and how long its listing may grow.

    Byte quotas let 400 empty files with 200-character names in under 10 MiB,
    and every ``list`` then carried 104 KiB.  A save of a *new* name is refused
    with ``quota_exceeded`` when the folder would pass either cap (replacing a
    file changes neither); never is a listing cut short.  Saves of new names
    in flight on this instance count, so concurrent uploads cannot each fit.
    """

    def __init__(
        self, max_files: int | None, max_listing: int, override: Callable[[str], int | None]
    ) -> None:
        self.max_files = max_files
        self.max_listing = max_listing
        self._override = override
        self._creating: dict[str, Counter[str]] = {}

    def max_files_of(self, client: str) -> int | None:
        override = self._override(client)
        if override is None:
            return self.max_files
        return None if override == NO_QUOTA else override

    async def check(self, client: str, folder: IFolder, name: str, *, moving: bool = False) -> None:
        """Raise quota_exceeded if a new entry ``name`` would not fit.

        Folders made on the way to it count too; ``moving``: the entry exists
        elsewhere and only those folders are new (a rename).
        """
        if not moving and await folder.kind(name) is not None:
            return  # a replacement: the counts do not change
        new = await _missing_folders(folder, name) + (0 if moving else 1)
        creating = {n for n, count in self._creating.get(client, {}).items() if count}
        creating.discard(name)  # held by this save itself: counted in ``new``
        max_files = self.max_files_of(client)
        if max_files is not None and new:
            _, entries = await folder.usage()
            total = entries + len(creating) + new
            if total > max_files:
                raise ProtocolError(
                    errors.QUOTA_EXCEEDED,
                    f"this would make {total} files and folders; this folder may hold {max_files}",
                )
        parent = parent_of(name)
        try:
            siblings = await folder.entries(parent, False, None, _LISTING_PROBE)
        except NotFound:
            siblings = []  # the save will create the folder
        names = {entry.name for entry in siblings} | {name.rpartition("/")[2]}
        names |= {n.rpartition("/")[2] for n in creating if parent_of(n) == parent}
        if len(siblings) > _LISTING_PROBE or listing_bytes(names) > self.max_listing:
            raise self._listing_too_long()

    async def check_many(self, client: str, folder: IFolder, names: list[str]) -> None:
        """``check`` for a whole batch at once: one listing per folder the batch
        writes into (which also tells new names from replacements), not one
        walk per file: 1,000 files into one folder would read it 1,000 times."""
        by_parent: dict[str, set[str]] = {}
        for name in names:
            by_parent.setdefault(parent_of(name), set()).add(name.rpartition("/")[2])
        existing: dict[str, set[str] | None] = {}  # None: the folder is not there yet
        for parent in by_parent:
            try:
                siblings = await folder.entries(parent, False, None, _LISTING_PROBE)
            except (NotFound, NotAFolder):  # the stores say not_a_folder, file by file
                existing[parent] = None
                continue
            if len(siblings) > _LISTING_PROBE:
                raise self._listing_too_long()
            existing[parent] = {entry.name for entry in siblings}
        known: dict[str, bool] = {}

        async def is_there(path: str) -> bool:
            """Whether a folder (or anything) is at ``path`` already."""
            if not path:
                return True
            if path in existing:
                return existing[path] is not None
            if path not in known:
                known[path] = await folder.kind(path) is not None
            return known[path]

        new_folders: set[str] = set()  # folders the batch's saves will create
        for parent, held in existing.items():
            path = parent
            while held is None and path and path not in new_folders and not await is_there(path):
                new_folders.add(path)
                path = parent_of(path)
        for path in new_folders:
            by_parent.setdefault(parent_of(path), set()).add(path.rpartition("/")[2])
        creating = {n for n, count in self._creating.get(client, {}).items() if count}
        creating -= set(names)
        for path in creating:
            by_parent.setdefault(parent_of(path), set()).add(path.rpartition("/")[2])
        new_files = sum(
            len(leaves - (existing.get(parent) or set())) for parent, leaves in by_parent.items()
        )
        max_files = self.max_files_of(client)
        if max_files is not None and new_files:
            _, entries = await folder.usage()
            total = entries + new_files
            if total > max_files:
                raise ProtocolError(
                    errors.QUOTA_EXCEEDED,
                    f"this would make {total} files and folders; this folder may hold {max_files}",
                )
        for parent, leaves in by_parent.items():
            if listing_bytes((existing.get(parent) or set()) | leaves) > self.max_listing:
                raise self._listing_too_long()

    def _listing_too_long(self) -> ProtocolError:
        return ProtocolError(
            errors.QUOTA_EXCEEDED,
            f"this would make a folder's listing longer than {self.max_listing}"
            " bytes; remove files or use shorter names",
        )

    async def hold(self, client: str, folder: IFolder, names: list[str]) -> Callable[[], None]:
        """Count ``names`` (one save's, or a batch's) as being created until the
        returned release is called; checked once held: two saves cannot both fit."""
        release = self._count_creating(client, names)
        try:
            if len(names) == 1:
                await self.check(client, folder, names[0])
            else:
                await self.check_many(client, folder, names)
        except BaseException:
            release()
            raise
        return release

    def _count_creating(self, client: str, names: list[str]) -> Callable[[], None]:
        creating = self._creating.setdefault(client, Counter())
        for name in names:
            creating[name] += 1

        def release() -> None:
            for name in names:
                creating[name] -= 1
                if creating[name] <= 0:
                    del creating[name]
            if not creating:
                self._creating.pop(client, None)

        return release
