"""Live updates: tell every connection of a client when its folder changed.

Changes are coalesced per client: the first change starts a short window,
and when it closes the folder is listed once and the list goes to every
command channel of that client (the one that made the change included).
Other clients hear nothing.  This object is the seam a shared bus (Redis
pub/sub, say) would plug into for several instances.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from wsfiles.storage import IStorage

_log = Logger()

#: How long changes are gathered before one ``changed`` event goes out.
COALESCE_SECONDS = 0.25

#: Gets the encoded ``changed`` message.
Listener = Callable[[bytes], None]


class ChangeHub:
    def __init__(self, storage: IStorage, clock: IReactorTime) -> None:
        self._storage = storage
        self._clock = clock
        self._listeners: dict[str | None, list[Listener]] = {}
        self._pending: dict[str | None, IDelayedCall] = {}
        self._listing: set[str | None] = set()
        self._again: set[str | None] = set()

    def subscribe(self, folder: str | None, listener: Listener) -> None:
        self._listeners.setdefault(folder, []).append(listener)

    def unsubscribe(self, folder: str | None, listener: Listener) -> None:
        listeners = self._listeners.get(folder, [])
        if listener in listeners:
            listeners.remove(listener)
        if not listeners:
            self._listeners.pop(folder, None)
            call = self._pending.pop(folder, None)
            if call is not None and call.active():
                call.cancel()

    def changed(self, folder: str | None) -> None:
        """``folder`` changed; its listeners hear about it shortly, once."""
        if folder not in self._listeners:
            return
        if folder in self._listing:
            self._again.add(folder)  # list again once the current listing is out
        elif folder not in self._pending:
            self._pending[folder] = self._clock.callLater(COALESCE_SECONDS, self._publish, folder)

    def _publish(self, folder: str | None) -> None:
        del self._pending[folder]
        self._listing.add(folder)
        d: Deferred = self._storage.folder(folder).list()

        def send(files: list[Any]) -> None:
            # Encoded once for every listener: a big folder makes a big message.
            payload = json.dumps(
                {"op": "changed", "files": [info.as_json() for info in files]}
            ).encode("utf-8")
            for listener in list(self._listeners.get(folder, [])):
                try:
                    listener(payload)
                except Exception:  # one broken connection must not starve the others
                    _log.failure("could not send a changed event")

        def done(result: Any) -> None:
            self._listing.discard(folder)
            if folder in self._again:
                self._again.discard(folder)
                self.changed(folder)

        d.addCallback(send)
        d.addErrback(lambda f: _log.failure("could not list a changed folder", f))
        d.addBoth(done)

    def close(self) -> None:
        for call in self._pending.values():
            if call.active():
                call.cancel()
        self._pending.clear()
