"""Live mode: re-plan when the local tree or the server's folder changes.

Local changes are watched with ``twisted.internet.inotify`` (Linux only; no
extra dependency), the whole tree recursively (new folders get watches as they
appear); elsewhere, or when the kernel refuses more watches, the tree is
rescanned every :data:`POLL_SECONDS` instead.  Server changes arrive as the
protocol's ``changed`` events on the command channel.  Either one wakes the
loop; events are coalesced for :data:`SETTLE_SECONDS`, then one round runs
(scan, list, plan, run), one round at a time: events that arrive during a
round cause one more round after it.  Files still being written are planned
again after the quiet time; paths the server changed meanwhile, after
:data:`RETRY_SECONDS`; paths that failed (a local error), after
:data:`FAILED_SECONDS`.

A dropped connection is reconnected with exponential backoff (1 s doubling
to 30 s), and the next round is a full reconcile, so nothing heard or missed
while away is lost.  A round the server refused for a reason that may pass
(``storage_error``, ``internal_error``, ``rate_limited``) is said and tried
again after :data:`TRANSIENT_SECONDS`; any other error ends the sync.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.internet.defer import Deferred

from wsfiles.sync.localtree import QUIET_SECONDS, is_excluded
from wsfiles.sync.state import STATE_DIR

#: Events within this long are taken together (one round for a burst).
SETTLE_SECONDS = 0.3
#: A path left for later (the server changed it meanwhile): planned again after this.
RETRY_SECONDS = 1.0
#: A path that failed (a local file that cannot be written, say): tried again after this.
FAILED_SECONDS = 30.0
#: Without inotify: how often the local tree is rescanned.
POLL_SECONDS = 5.0
#: Reconnection backoff: first wait and cap.
BACKOFF_FIRST = 1.0
BACKOFF_MAX = 30.0

#: A round refused for a reason that may pass: tried again after this (live mode).
TRANSIENT_SECONDS = 5.0

Connect = Callable[[], Awaitable[Any]]
#: Server refusals that may pass: live mode says so and tries again.
_TRANSIENT_CODES = frozenset({"storage_error", "internal_error", "rate_limited"})

#: Client-side and server codes that mean the connection, not the request, failed.
_CONNECTION_CODES = frozenset(
    {"connection_failed", "channel_closed", "stalled", "superseded", "shutting_down"}
)


def pause(seconds: float) -> Deferred:
    """A cancellable wait (Ctrl-C cancels it)."""
    return task.deferLater(reactor, seconds, lambda: None)


def connected(client: Any) -> bool:
    """Whether the client's command channel is still open."""
    return getattr(client, "_command", None) is not None


def is_connection_error(error: BaseException, client: Any) -> bool:
    """The round failed because the connection went, not because of a request."""
    from wsfiles.client import WsfilesError

    if isinstance(error, WsfilesError) and error.code in _CONNECTION_CODES:
        return True
    return not connected(client) and isinstance(error, WsfilesError | AssertionError)


async def reconnect_with_backoff(
    connect: Connect, attempts: int | None = None, say: Callable[[str], None] | None = None
) -> Any:
    """Connect, waiting 1, 2, 4... (at most 30) seconds between failed attempts;
    with ``attempts``, give up (raise the last error) after that many."""
    from wsfiles.client import WsfilesError

    delay = BACKOFF_FIRST
    tried = 0
    while True:
        try:
            return await connect()
        except WsfilesError as e:
            tried += 1
            if attempts is not None and tried >= attempts:
                raise
            if say is not None:
                say(f"cannot reconnect ({e.code}): trying again in {delay:.0f} s")
            await pause(delay)
            delay = min(delay * 2, BACKOFF_MAX)


class _Wakeup:
    """Coalesces wake-ups: ``poke`` any number of times, ``wait`` returns once."""

    def __init__(self) -> None:
        self.pending = False
        self._waiter: Deferred | None = None
        self._timer: Any = None

    def poke(self) -> None:
        self.pending = True
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.called:
            waiter.callback(None)

    def poke_later(self, seconds: float) -> None:
        """Wake after ``seconds`` (one timer: an earlier one is kept)."""
        if self._timer is not None and self._timer.active():
            return
        self._timer = reactor.callLater(seconds, self.poke)

    async def wait(self) -> None:
        if not self.pending:
            self._waiter = Deferred()
            await self._waiter
        self.pending = False

    def stop(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None


class _LocalWatch:
    """inotify on the whole tree (Linux), or a periodic poke: every ``poll``
    seconds when asked (network file systems, where inotify does not see what
    other machines change), every :data:`POLL_SECONDS` where inotify is missing."""

    def __init__(
        self,
        root: Path,
        excludes: list[str],
        wake: _Wakeup,
        say: Callable[[str], None],
        poll: float | None = None,
        clock: Any = reactor,
    ) -> None:
        self.root = root
        self.excludes = excludes
        self.wake = wake
        self._clock = clock
        self._notifier: Any = None
        self._poll: task.LoopingCall | None = None
        if poll is not None:
            self._start_polling(poll)
            return
        try:
            from twisted.internet import inotify
            from twisted.python.filepath import FilePath

            notifier = inotify.INotify(reactor)
            notifier.startReading()
            try:
                mask = (
                    inotify.IN_CLOSE_WRITE
                    | inotify.IN_MODIFY
                    | inotify.IN_ATTRIB
                    | inotify.IN_CREATE
                    | inotify.IN_DELETE
                    | inotify.IN_MOVED_FROM
                    | inotify.IN_MOVED_TO
                    | inotify.IN_DELETE_SELF
                    | inotify.IN_MOVE_SELF
                )
                notifier.watch(
                    FilePath(str(root)),
                    mask=mask,
                    autoAdd=True,
                    recursive=True,
                    callbacks=[self._event],
                )
            except BaseException:
                notifier.loseConnection()
                raise
            self._notifier = notifier
        except Exception as e:  # no inotify here (not Linux), or out of watches
            say(f"local changes are polled every {POLL_SECONDS:.0f} s (no inotify: {e})")
            self._start_polling(POLL_SECONDS)

    def _start_polling(self, seconds: float) -> None:
        self._poll = task.LoopingCall(self.wake.poke)
        self._poll.clock = self._clock
        self._poll.start(seconds, now=False)

    def _event(self, _watch: Any, filepath: Any, _mask: int) -> None:
        try:  # (Twisted hands over the path as bytes)
            rel = os.path.relpath(os.fsdecode(filepath.path), self.root).replace(os.sep, "/")
        except (ValueError, TypeError):
            self.wake.poke()
            return
        if rel == STATE_DIR or rel.startswith(STATE_DIR + "/"):
            return  # our own state: never a reason to sync
        if rel != "." and is_excluded(rel, self.excludes):
            return
        self.wake.poke()

    def stop(self) -> None:
        if self._notifier is not None:
            self._notifier.loseConnection()
            self._notifier = None
        if self._poll is not None and self._poll.running:
            self._poll.stop()


def _concerns(folder: str, base: str) -> bool:
    """Whether a ``changed`` event for ``folder`` touches the synced folder ``base``."""
    if not base or folder == base:
        return True
    return folder.startswith(base + "/") or base.startswith(folder + "/") or folder == ""


async def _listen(client: Any, base: str, wake: _Wakeup) -> None:
    """Poke ``wake`` for every ``changed`` event about the synced folder; ends
    (pokes too) when the command channel closes."""
    closed: Deferred = Deferred()
    factory = getattr(client, "_command_factory", None)
    if factory is not None:

        def gone(result: Any) -> Any:
            if not closed.called:
                closed.callback(None)
            return result

        factory.closed.addBoth(gone)
    while True:
        got: list[dict[str, Any]] = []
        change = client.folder_changes.get()
        change.addCallback(got.append)
        await defer.DeferredList([change, closed], fireOnOneCallback=True, consumeErrors=True)
        if not got:  # the channel closed
            change.cancel()
            wake.poke()
            return
        if _concerns(str(got[0].get("path") or ""), base):
            wake.poke()


async def live(
    syncer: Any,
    connect: Connect,
    say: Callable[[dict[str, Any]], None],
    poll: float | None = None,
) -> None:
    """Keep the local root and the remote folder in sync until cancelled (Ctrl-C);
    ``poll``: rescan every so many seconds instead of watching with inotify."""

    def notice(line: str) -> None:
        say({"event": "notice", "message": line})
        sys.stderr.write(f"wsfiles sync: {line}\n")

    wake = _Wakeup()
    watch = _LocalWatch(syncer.root, syncer.excludes, wake, notice, poll)
    first_client = syncer.client
    listening: Deferred | None = None
    try:
        while True:
            if listening is None or listening.called:
                listening = defer.ensureDeferred(_listen(syncer.client, syncer.base, wake))
                listening.addErrback(lambda f: f.trap(defer.CancelledError))
            try:
                if not connected(syncer.client):
                    raise _Lost()
                outcome = await syncer.round()
            except Exception as e:
                if _is_transient(e) and connected(syncer.client):
                    notice(f"{e}: trying again in {TRANSIENT_SECONDS:.0f} s")
                    wake.poke_later(TRANSIENT_SECONDS)
                    await wake.wait()
                    continue
                if not isinstance(e, _Lost) and not is_connection_error(e, syncer.client):
                    raise
                notice("the connection was lost: reconnecting")
                listening.cancel()
                await syncer.client.abort()  # whatever is left of it
                syncer.client = await reconnect_with_backoff(connect, say=notice)
                notice("reconnected")
                wake.poke()  # a full reconcile
                continue
            result = outcome.result
            if outcome.plan.waiting:
                wake.poke_later(QUIET_SECONDS + 0.1)
            elif result is not None and result.failed:
                wake.poke_later(FAILED_SECONDS)  # (not a busy loop on a lasting error)
            elif result is not None and result.retry:
                wake.poke_later(RETRY_SECONDS)
            elif not outcome.settled:
                wake.poke()  # one more round, to see the work done settle
            await wake.wait()
            await pause(SETTLE_SECONDS)  # let a burst of events finish
            wake.pending = False  # (the round below sees them; later ones wake again)
    finally:
        wake.stop()
        watch.stop()
        if listening is not None:
            listening.cancel()
        await _drop(syncer.client, first_client)


def _is_transient(error: BaseException) -> bool:
    """A refusal that may pass (the server's storage, or its rate limit)."""
    from wsfiles.client import WsfilesError

    return isinstance(error, WsfilesError) and error.code in _TRANSIENT_CODES


class _Lost(Exception):
    """The command channel is closed."""


async def _drop(client: Any, first: Any) -> None:
    """Drop a reconnected client (the first one is the CLI's to close)."""
    if client is not first:
        await client.abort()
