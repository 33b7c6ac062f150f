"""Per-client quotas, counting uploads in flight and interrupted ones kept for resuming.

A save reserves its full declared size from ``ready`` until it ends, so a
client with one byte left cannot start a terabyte upload.  Replacing a file
counts only the difference.  Reservations are per client, across all of its
connections.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from wsfiles import errors
from wsfiles.errors import ProtocolError
from wsfiles.storage import IFolder
from wsfiles.users import NO_QUOTA


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

    async def reserve(self, client: str, folder: IFolder, name: str, size: int) -> Reservation:
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

    async def _fits(self, client: str, folder: IFolder, name: str, extra: int) -> None:
        quota = self.quota_of(client)
        if quota is None:
            return
        files = await folder.list()
        partials = await folder.partial_bytes()
        partials.pop(name, None)  # a resumed upload's own bytes are in its size
        used = sum(f.size for f in files) + sum(partials.values())
        replaced = next((f.size for f in files if f.name == name), 0)
        needed = used - replaced + self._reserved[client] + extra
        if needed > quota:
            raise ProtocolError(
                errors.QUOTA_EXCEEDED,
                f"this save needs {needed} bytes of a {quota}-byte quota",
            )
