"""Live updates: tell every connection of a client when one of its folders changed.

Changes are coalesced per client and folder: the first change starts a short
window, and when it closes the folder is listed once and the result goes to
every command channel of that client (the one that made the change included).
Other clients hear nothing.  Protocol 1.1 channels hear of the top folder only,
as the complete file list; 1.2 channels hear of every folder, each event
carrying that folder's entries (never a whole tree).  This object is the seam
a shared bus (Redis pub/sub) plugs into for several instances.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from wsfiles.names import is_within
from wsfiles.storage import IStorage, NotAFolder, NotFound

_log = Logger()

#: How long changes are gathered before one ``changed`` event goes out.
COALESCE_SECONDS = 0.25
#: Entries a 1.2 event carries at most (``max_list``); a bigger folder's event
#: says ``"more": true`` and the client lists it in pages.
MAX_EVENT_ENTRIES = 1000

#: Gets the encoded 1.1 ``changed`` message (the top folder's files).
Listener = Callable[[bytes], None]
#: Gets the folder's path and the encoded 1.2 ``changed`` message.
FolderListener = Callable[[str, bytes], None]

_Key = tuple[str | None, str]  # (client folder, path inside it)

#: How long a cached ``list`` reply may be served with no change heard.  Changes
#: made through wsfiles (on this instance, or on another one through Redis)
#: drop it at once; this bounds how long a change that another program makes
#: in a local folder (or that another instance makes while Redis is away)
#: takes to show in ``list``.  docs/performance.md, "Issue 18's levers".
LISTING_TTL = 1.0
#: Cached listings together keep at most this many bytes (the oldest go first);
#: a bigger listing is not cached.
LISTING_CACHE_BYTES = 32 * 1024 * 1024
LISTING_CACHE_LARGEST = 4 * 1024 * 1024

#: (client folder, folder path, what was asked: "1.1", or "1.2 LIMIT")
_ListingKey = tuple[str | None, str, str]


class ListingCache:
    """Encoded ``list`` replies (without their id), kept until their folder changes.

    A folder's listing is read and JSON-encoded once per change instead of
    once per ``list``.  ``changed(folder, path)`` drops every listing the
    change can alter: the folder's own, its ancestors' (the folder's mtime is
    in its parent's; on S3 a folder exists while something is below it) and
    those below it (a folder moved or removed there).  A listing
    read while any change was heard is not kept: it may predate the change.
    """

    def __init__(
        self,
        clock: IReactorTime,
        ttl: float | None = None,
        budget: int | None = None,
    ) -> None:
        self._clock = clock
        self._ttl = LISTING_TTL if ttl is None else ttl
        self._budget = LISTING_CACHE_BYTES if budget is None else budget
        self._bytes = 0
        #: In insertion order: the oldest first.
        self._entries: dict[_ListingKey, tuple[float, bytes]] = {}
        self._by_folder: dict[str | None, set[_ListingKey]] = {}
        #: Counts the changes heard: a listing read across one is not kept.
        self.generation = 0

    def get(self, key: _ListingKey) -> bytes | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if self._clock.seconds() >= entry[0]:
            self._drop(key)
            return None
        return entry[1]

    def put(self, key: _ListingKey, payload: bytes, generation: int) -> None:
        """Keep ``payload``, read since ``generation`` (taken before reading)."""
        if generation != self.generation or len(payload) > min(LISTING_CACHE_LARGEST, self._budget):
            return
        self._drop(key)
        now = self._clock.seconds()
        # Insertion order is expiry order (one TTL): the expired go first.
        while self._entries:  # bounded: each round drops one
            oldest = next(iter(self._entries))
            if self._entries[oldest][0] > now:
                break
            self._drop(oldest)
        self._entries[key] = (now + self._ttl, payload)
        self._by_folder.setdefault(key[0], set()).add(key)
        self._bytes += _charge(key, payload)
        while self._bytes > self._budget:  # bounded: each round drops one
            self._drop(next(iter(self._entries)))

    def forget(self, folder: str | None) -> None:
        """No longer hearing of ``folder``'s changes (its last listener left,
        and with Redis its subscription ends): keep none of its listings."""
        for key in list(self._by_folder.get(folder, ())):
            self._drop(key)

    def changed(self, folder: str | None, path: str) -> None:
        self.generation += 1
        keys = self._by_folder.get(folder)
        if not keys:
            return
        for key in [key for key in keys if _related(key[1], path)]:
            self._drop(key)

    def _drop(self, key: _ListingKey) -> None:
        entry = self._entries.pop(key, None)
        if entry is None:
            return
        self._bytes -= _charge(key, entry[1])
        keys = self._by_folder[key[0]]
        keys.discard(key)
        if not keys:
            del self._by_folder[key[0]]


#: What an entry costs besides its payload (the key, the dict slots, the set).
_ENTRY_OVERHEAD = 400


def _charge(key: _ListingKey, payload: bytes) -> int:
    return len(payload) + len(key[1]) + _ENTRY_OVERHEAD


class ChangeHub:
    def __init__(self, storage: IStorage, clock: IReactorTime) -> None:
        self._storage = storage
        self._clock = clock
        self._listeners: dict[str | None, list[Listener]] = {}
        self._folder_listeners: dict[str | None, list[FolderListener]] = {}
        self._pending: dict[_Key, IDelayedCall] = {}
        self._listing: set[_Key] = set()
        self._again: set[_Key] = set()
        #: ``list`` replies, dropped by every change heard here.
        self.listings = ListingCache(clock)

    def subscribe(self, folder: str | None, listener: Any, *, folders: bool = False) -> None:
        """Hear of ``folder``'s changes: as 1.1 events, or (``folders``) 1.2 ones."""
        listeners = self._folder_listeners if folders else self._listeners
        listeners.setdefault(folder, []).append(listener)

    def unsubscribe(self, folder: str | None, listener: Any, *, folders: bool = False) -> None:
        listeners = self._folder_listeners if folders else self._listeners
        registered = listeners.get(folder, [])
        if listener in registered:
            registered.remove(listener)
        if not registered:
            listeners.pop(folder, None)
        if not self.has_listeners(folder):
            for key in [key for key in self._pending if key[0] == folder]:
                call = self._pending.pop(key)
                if call.active():
                    call.cancel()
            # Nobody here hears its changes any more (with Redis, its channel
            # is left): a later connection must not get an old listing.
            self.listings.forget(folder)

    def has_listeners(self, folder: str | None) -> bool:
        return folder in self._listeners or folder in self._folder_listeners

    def changed(self, folder: str | None, path: str = "") -> None:
        """Folder ``path`` of client folder ``folder`` changed; its listeners hear
        about it shortly, once.  Its cached listings go at once (before the
        reply to the command that made the change)."""
        self.listings.changed(folder, path)
        if not self.has_listeners(folder):
            return
        key = (folder, path)
        if key in self._listing:
            self._again.add(key)  # list again once the current listing is out
        elif key not in self._pending:
            self._pending[key] = self._clock.callLater(COALESCE_SECONDS, self._publish, key)

    def _publish(self, key: _Key) -> None:
        del self._pending[key]
        self._listing.add(key)
        d = defer.ensureDeferred(self._send(key))
        d.addErrback(lambda f: _log.failure("could not list a changed folder", f))

        def done(result: Any) -> None:
            self._listing.discard(key)
            if key in self._again:
                self._again.discard(key)
                self.changed(*key)

        d.addBoth(done)

    async def _send(self, key: _Key) -> None:
        folder, path = key
        store = self._storage.folder(folder)
        # Each event is encoded once for every listener: a big folder makes a big message.
        if path == "" and self._listeners.get(folder):
            files = await store.list()
            payload = _encode({"op": "changed", "files": [info.as_json() for info in files]})
            _deliver(self._listeners.get(folder, []), payload)
        if self._folder_listeners.get(folder):
            try:
                entries = await store.entries(path, False, None, MAX_EVENT_ENTRIES)
            except (NotFound, NotAFolder):
                return  # removed since: its parent's event tells
            event: dict[str, Any] = {"op": "changed", "path": path}
            if len(entries) > MAX_EVENT_ENTRIES:
                event["more"] = True
            else:
                event["files"] = [entry.as_entry() for entry in entries]
            payload = _encode(event)
            _deliver(self._folder_listeners.get(folder, []), payload, path)

    def close(self) -> None:
        for call in self._pending.values():
            if call.active():
                call.cancel()
        self._pending.clear()


def _related(listed: str, changed: str) -> bool:
    """Whether a change of folder ``changed`` can alter the listing of ``listed``:
    one of them holds the other (or they are the same)."""
    return not listed or not changed or is_within(listed, changed) or is_within(changed, listed)


def _encode(event: dict[str, Any]) -> bytes:
    return json.dumps(event).encode("utf-8")


def _deliver(listeners: list[Any], payload: bytes, *path: str) -> None:
    for listener in list(listeners):
        try:
            listener(*path, payload)
        except Exception:  # one broken connection must not starve the others
            _log.failure("could not send a changed event")
