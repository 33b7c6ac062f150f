"""Carry out a sync plan over one command channel: verified, resumable, recorded.

Every action re-checks its precondition at the last moment and records (or
forgets) its state row right after it succeeds (downloads' rows in groups of
:data:`RECORDS_AT_ONCE`, and whenever the run ends: a row lost in a crash only
makes the next run record the same content again), so a Ctrl-C, a crash or a
dropped connection leaves the state true for what was done, and the next run
continues from there:

- an upload is a ``save`` with ``if_sha256`` (the content last synced) or
  ``if_absent``: a ``conflict`` means the server changed meanwhile, so the
  path is left for the next round's plan, never overwritten;
- a download goes into ``LOCAL/.wsfiles-sync/partial/`` (resumed if a killed
  run left one), is verified by the client (SHA-256), gets the server's mtime,
  and replaces the local file only if that file is still what the scan saw
  (otherwise the local copy is kept under a conflict name first);
- a local delete happens only if the file still has the synced size, mtime
  and inode; a remote one only with ``if_sha256``.

Transfers are sent without waiting for each other (:data:`PIPELINE` at once):
the server queues them and runs them one after another on the file channel,
so many small files do not pay a round trip each.  Uploads of small files
(up to :data:`BATCHED_FILE`) go first, in ``save_batch`` commands of up to
1000 files and :data:`BATCH_BYTES` (docs/protocol.md): one command and one
message for many files, each with the same guard as its own ``save``.
"""

from __future__ import annotations

import json
import os
import stat
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor, task, threads

from wsfiles.sync.guard import MAX_DELETE_PERCENT, big_deletes, check_deletes
from wsfiles.sync.localtree import (
    conflict_name,
    is_excluded,
    local_path,
    local_sha256,
    scan,
    short_host,
)
from wsfiles.sync.model import Action, Direction, Kind, LocalFile, Plan, RemoteFile, Synced
from wsfiles.sync.plan import reconcile
from wsfiles.sync.state import SyncState, partial_dir, partial_path

#: Transfers in flight at once (the server's transfer queue takes up to 1000).
PIPELINE = 64
#: Uploads of files up to this size go in batches (``save_batch``).
BATCHED_FILE = 256 * 1024
#: Bytes of one batch at most (read into memory before it is sent).
BATCH_BYTES = 16 * 1024 * 1024
#: Files of one batch at most (the server's limit).
BATCH_FILES = 1000
#: The batch command's JSON at most: the server refuses commands over 64 KiB
#: (wsfiles.config.COMMAND_MESSAGE_LIMIT) by closing the channel.
BATCH_COMMAND_BYTES = 60 * 1024
#: Downloads' state rows committed together (see Runner._record_soon).
RECORDS_AT_ONCE = 100
#: A command refused as ``rate_limited`` (not run) is sent again after this
#: long, at most this many times in all.
RATE_LIMITED_WAIT = 1.0
RATE_LIMITED_TRIES = 30
#: Error codes that concern one path only: said, and the path is tried again next round.
PATH_ERRORS = frozenset(
    {
        "conflict",
        "not_found",
        "exists",
        "invalid_name",
        "is_a_folder",
        "not_a_folder",
        "too_large",
        "quota_exceeded",
        "checksum_mismatch",
        "size_mismatch",
    }
)

#: Of those, the ones that will not pass by themselves: said as errors, and
#: live mode tries the path again only after FAILED_SECONDS, not every second.
LASTING_ERRORS = frozenset(
    {"too_large", "quota_exceeded", "invalid_name", "is_a_folder", "not_a_folder"}
)

#: (files done, files total, bytes done, bytes total)
Progress = Callable[[int, int, int, int], None]
Emit = Callable[[dict[str, Any]], None]


@dataclass
class RunResult:
    """What one run of a plan did and what it left for the next round."""

    done: int = 0
    conflicts: list[tuple[str, str]] = field(default_factory=list)  # (path, local copy)
    retry: list[tuple[str, str]] = field(default_factory=list)  # (path, why)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, error line)


def remote_name(base: str, path: str) -> str:
    """The server's name for ``path`` under the synced folder ``base``."""
    return f"{base}/{path}" if base else path


def _lstat(path: Path) -> os.stat_result | None:
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return st


def _same(st: os.stat_result | None, size: int, mtime_ns: int, inode: int) -> bool:
    return (
        st is not None
        and stat.S_ISREG(st.st_mode)
        and (st.st_size, st.st_mtime_ns, st.st_ino) == (size, mtime_ns, inode)
    )


def _matches_scan(st: os.stat_result | None, scanned: LocalFile | None) -> bool:
    """The local file is exactly what the scan saw (or is still absent)."""
    if scanned is None:
        return st is None
    return _same(st, scanned.size, scanned.mtime_ns, scanned.inode)


def _open_partial(root: Path, path: str, size: int) -> tuple[Path, Any]:
    """The partial download of ``path``, opened at its end (a killed run's bytes
    are kept), or emptied if it holds more than the ``size`` bytes listed now:
    it was of another version, and resuming past the end is refused."""
    partial = partial_path(root, path)
    sink = open(partial, "a+b")  # noqa: SIM115 (the caller closes it)
    if sink.seek(0, os.SEEK_END) > size:
        sink.truncate(0)
        sink.seek(0)
    return partial, sink


def _land(
    sink: Any,
    partial: Path,
    mtime: float | None,
    root: Path,
    action: Action,
    scanned: LocalFile | None,
) -> tuple[bool, str | None, os.stat_result | None]:
    """Put a verified download in place (in a thread): fsync it, give it the
    server's mtime, keep a local file that is not what the scan saw under a
    conflict name (the server's copy keeps the name), then rename it over.

    Returns (False, None, None) when a local folder has the name (nothing
    done), else (True, the conflict copy's path or None, the file's stat).
    """
    sink.flush()
    os.fsync(sink.fileno())
    sink.close()
    if mtime is not None:
        ns = round(mtime * 1e9)
        os.utime(partial, ns=(ns, ns))
    target = local_path(root, action.path)
    current = _lstat(target)
    copy: str | None = None
    if action.kind is Kind.CONFLICT and current is not None:
        copy = action.to or conflict_copy_name(root, action.path)
    elif current is not None and not _matches_scan(current, scanned):
        copy = conflict_copy_name(root, action.path)  # changed here since the scan
    if copy is not None:
        assert current is not None
        if stat.S_ISDIR(current.st_mode):
            partial.unlink(missing_ok=True)
            return False, None, None
        if _lstat(local_path(root, copy)) is not None:  # (taken meanwhile)
            copy = conflict_copy_name(root, action.path)
        os.rename(target, local_path(root, copy))
    os.replace(partial, target)
    return True, copy, os.lstat(target)


async def _within_rate(command: Callable[[], Awaitable[Any]]) -> Any:
    """Run ``command``; refused as ``rate_limited`` (it was not run), run it
    again after RATE_LIMITED_WAIT, RATE_LIMITED_TRIES times at most."""
    from wsfiles.client import WsfilesError

    for tries in range(RATE_LIMITED_TRIES):
        try:
            return await command()
        except WsfilesError as e:
            if e.code != "rate_limited" or tries == RATE_LIMITED_TRIES - 1:
                raise
            await task.deferLater(reactor, RATE_LIMITED_WAIT, lambda: None)
    raise AssertionError("unreachable")  # (the last try returns or raises)


def _synced(path: str, st: os.stat_result, sha256: str, remote_mtime: float | None) -> Synced:
    """The state row of ``path`` in sync now: the local file as ``st`` shows
    it, the server's copy with ``remote_mtime`` (the local one when unknown)."""
    mtime = float(remote_mtime) if remote_mtime is not None else st.st_mtime_ns / 1e9
    return Synced(path, st.st_size, sha256, st.st_mtime_ns, st.st_ino, mtime)


def _fsync_folder(folder: Path) -> None:
    """Make the renames in ``folder`` durable (a folder gone meanwhile has none)."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def conflict_copy_name(root: Path, path: str) -> str:
    """A free conflict name for the local loser of ``path`` (localtree's rule)."""
    return conflict_name(path, taken=lambda name: _lstat(local_path(root, name)) is not None)


class Runner:
    """Runs plans for one local root and one remote folder over ``client``."""

    def __init__(
        self,
        client: Any,
        root: Path,
        base: str,
        state: SyncState,
        *,
        emit: Emit | None = None,
        progress: Progress | None = None,
        pipeline: int = PIPELINE,
    ) -> None:
        self.client = client
        self.root = root
        self.base = base
        self.state = state
        self.emit: Emit = emit or (lambda event: None)
        self.progress = progress
        self.pipeline = max(1, pipeline)
        self.local: Mapping[str, LocalFile] = {}
        self.remote: Mapping[str, RemoteFile] = {}

    # -- the whole plan ----------------------------------------------------

    async def run(
        self,
        plan: Plan,
        local: Mapping[str, LocalFile],
        remote: Mapping[str, RemoteFile],
    ) -> RunResult:
        """Carry out ``plan`` (made from the scan ``local`` and the listing
        ``remote``).  Per-path refusals are collected in the result; anything
        else (the connection lost, Ctrl-C) raises, with every finished action
        already recorded."""
        self.local, self.remote = local, remote
        result = RunResult()
        transfers = [a for a in plan.actions if a.kind in _TRANSFERS]
        self._files_total = len(transfers)
        self._bytes_total = sum(a.size for a in transfers)
        self._files_done = 0
        self._bytes_done = 0
        self._in_flight: dict[str, int] = {}
        self._pending_rows: list[Synced] = []
        self._folders_made: set[Path] = set()
        try:
            return await self._run(plan, result)
        finally:
            self._flush_rows()

    async def _run(self, plan: Plan, result: RunResult) -> RunResult:
        self._report()
        records = [a for a in plan.actions if a.kind in _STATE_ONLY]
        if records:
            with self.state.batch():  # one commit for them all
                for action in records:
                    if action.kind is Kind.RECORD:
                        self._record_equal(action)
                    else:
                        self.state.forget(action.path)
            result.done += len(records)
        batched = self._batched_file if self._batches_small else -1  # (-1: no batches)
        small = [a for a in plan.actions if a.kind is Kind.UPLOAD and a.size <= batched]
        in_batches = set(small)
        batch: list[Action] = []
        for action in plan.actions:
            if action.kind in _STATE_ONLY or action in in_batches:
                continue  # recorded above; in a save_batch, below
            if action.kind in _PIPELINED:
                batch.append(action)
                continue
            await self._pipelined(batch, result)
            batch = []
            await self._one(action, result)
        await self._upload_batches(small, result)
        await self._pipelined(batch, result)
        return result

    @property
    def _batched_file(self) -> int:
        """Files up to this size go in batches: BATCHED_FILE, or the server's
        ``max_size`` if smaller (the server refuses a whole batch for one file
        over it; a single ``save`` refuses only that file)."""
        max_size = getattr(self.client, "hello", {}).get("max_size")
        if isinstance(max_size, int) and not isinstance(max_size, bool):
            return min(BATCHED_FILE, max_size)
        return BATCHED_FILE

    @property
    def _batches_small(self) -> bool:
        """Whether the server takes ``save_batch`` (protocol 1.2; every 1.2 server here)."""
        return bool(getattr(self.client, "folders", False))

    async def _upload_batches(self, actions: list[Action], result: RunResult) -> None:
        """Upload small files in ``save_batch`` commands; per-file refusals
        are said and left for the next round, like a single save's."""
        from wsfiles.client import BatchFile

        group: list[tuple[Action, os.stat_result, BatchFile]] = []
        size = command = 0
        for action in actions:
            read = self._read_small(action, result)
            if read is None:
                continue
            entry = len(json.dumps(read[1].declared())) + 2
            if group and (
                len(group) >= BATCH_FILES
                or size + len(read[1].data) > BATCH_BYTES
                or command + entry > BATCH_COMMAND_BYTES
            ):
                await self._upload_batch(group, result)
                group, size, command = [], 0, 0
            group.append((action, *read))
            size += len(read[1].data)
            command += entry
        if group:
            await self._upload_batch(group, result)

    def _read_small(self, action: Action, result: RunResult) -> tuple[os.stat_result, Any] | None:
        """The file's bytes as a BatchFile, if it is still what the scan saw."""
        from wsfiles.client import BatchFile

        target = local_path(self.root, action.path)
        try:
            with open(target, "rb") as source:
                st = os.fstat(source.fileno())
                scanned = self.local.get(action.path)
                if (scanned is not None and not _matches_scan(st, scanned)) or (
                    st.st_size > self._batched_file
                ):
                    self._retry(result, action.path, "the local file changed since the scan")
                    return None
                data = source.read(st.st_size + 1)
        except (FileNotFoundError, NotADirectoryError):
            self._retry(result, action.path, "the local file is gone since the scan")
            return None
        except OSError as e:
            line = f"cannot use {target}: {e.strerror or e}"
            result.failed.append((action.path, line))
            self.emit({"event": "error", "path": action.path, "message": line})
            return None
        if len(data) != st.st_size:
            self._retry(result, action.path, "the local file changed while it was read")
            return None
        file = BatchFile(
            remote_name(self.base, action.path),
            data,
            mtime=st.st_mtime_ns / 1e9,
            if_sha256=action.expect_remote_sha256 or None,
            if_absent=not action.expect_remote_sha256,
        )
        return st, file

    async def _upload_batch(
        self, group: list[tuple[Action, os.stat_result, Any]], result: RunResult
    ) -> None:
        from wsfiles.client import WsfilesError

        try:
            outcomes = await self.client.save_batch([file for _, _, file in group])
        except WsfilesError as e:
            if e.code not in PATH_ERRORS:
                raise
            # Refused whole (the batch's total is over the quota, which does
            # not subtract what it replaces): each file goes on its own, so
            # those that fit are stored and each refusal names its file.
            await self._pipelined([action for action, _, _ in group], result)
            return
        with self.state.batch():  # one commit for the batch
            for (action, st, _), outcome in zip(group, outcomes, strict=True):
                if "error" in outcome:
                    self._refused(result, action.path, outcome["error"], outcome["message"])
                    continue
                self.state.record(_synced(action.path, st, outcome["sha256"], outcome.get("mtime")))
                self._done(result, action)

    async def _pipelined(self, actions: list[Action], result: RunResult) -> None:
        """Run transfers with up to ``pipeline`` in flight; the first
        failure that is not about one path stops the rest and is raised."""
        if not actions:
            return
        limit = defer.DeferredSemaphore(self.pipeline)
        failed: list[BaseException] = []

        async def one(action: Action) -> None:
            if failed:
                return
            try:
                await self._one(action, result)
            except BaseException as e:
                failed.append(e)
                raise

        running = [limit.run(lambda a=a: defer.ensureDeferred(one(a))) for a in actions]
        try:
            await defer.DeferredList(running, consumeErrors=True)
        except defer.CancelledError:
            for d in running:
                d.cancel()
            raise
        if failed:
            raise failed[0]

    async def _one(self, action: Action, result: RunResult) -> None:
        from wsfiles.client import WsfilesError

        try:
            # Deletes and renames are charged to the command rate (bursts of
            # --rate-limit a second): wait for it, the command was not run.
            await _within_rate(lambda: _HANDLERS[action.kind](self, action, result))
        except WsfilesError as e:
            if e.code not in PATH_ERRORS:
                raise
            self._refused(result, action.path, e.code, e.message)
        except OSError as e:
            where = e.filename or action.path
            line = f"cannot use {where}: {e.strerror or e}"
            result.failed.append((action.path, line))
            self.emit({"event": "error", "path": action.path, "message": line})
        finally:
            if action.kind in _TRANSFERS:
                self._in_flight.pop(action.path, None)

    def _refused(self, result: RunResult, path: str, code: str, message: str) -> None:
        """The server refused one path: tried again next round, or, for a
        refusal that will not pass by itself (too large, over quota, a bad
        name...), counted as failed (live mode then waits longer)."""
        if code in LASTING_ERRORS:
            line = f"{code}: {message}"
            result.failed.append((path, line))
            self.emit({"event": "error", "path": path, "message": line})
        else:
            self._retry(result, path, f"{code}: {message}")

    def _retry(self, result: RunResult, path: str, why: str) -> None:
        result.retry.append((path, why))
        self.emit({"event": "retry", "path": path, "reason": why})

    def _done(self, result: RunResult, action: Action, **extra: Any) -> None:
        result.done += 1
        # The plan's fields (--json); a conflict said "conflict" and its copy's
        # name already: what is left is the server's copy coming down.
        event = {"event": action.kind.value, **action_fields(action)}
        del event["action"]
        if action.kind is Kind.CONFLICT:
            event["event"] = "download"
            event.pop("to", None)
        if action.kind in _TRANSFERS:
            self._files_done += 1
            self._bytes_done += action.size
            self._in_flight.pop(action.path, None)
            self._report()
        event.update(extra)
        self.emit(event)

    def _report(self) -> None:
        if self.progress is not None:
            moving = sum(self._in_flight.values())
            self.progress(
                self._files_done,
                self._files_total,
                min(self._bytes_done + moving, self._bytes_total),
                self._bytes_total,
            )

    def _moved(self, path: str) -> Callable[[int, int], None] | None:
        if self.progress is None:
            return None

        def report(done: int, _total: int) -> None:
            self._in_flight[path] = done
            self._report()

        return report

    # -- the actions -------------------------------------------------------

    def _record_equal(self, action: Action) -> None:
        scanned = self.local.get(action.path)
        listed = self.remote.get(action.path)
        if scanned is None or listed is None or action.sha256 is None:
            return
        self.state.record(
            Synced(
                action.path,
                scanned.size,
                action.sha256,
                scanned.mtime_ns,
                scanned.inode,
                listed.mtime,
            )
        )

    async def _upload(self, action: Action, result: RunResult) -> None:
        target = local_path(self.root, action.path)
        try:
            source = open(target, "rb")  # noqa: SIM115 (closed below)
        except (FileNotFoundError, NotADirectoryError):
            self._retry(result, action.path, "the local file is gone since the scan")
            return
        with source:
            st = os.fstat(source.fileno())
            scanned = self.local.get(action.path)
            if scanned is not None and not _matches_scan(st, scanned):
                self._retry(result, action.path, "the local file changed since the scan")
                return
            guard: dict[str, Any] = (
                {"if_sha256": action.expect_remote_sha256}
                if action.expect_remote_sha256
                else {"if_absent": True}
            )
            ack = await self.client.upload(
                remote_name(self.base, action.path),
                source,
                resume=True,
                mtime=st.st_mtime_ns / 1e9,
                progress=self._moved(action.path),
                pipelined=True,
                **guard,
            )
        self.state.record(_synced(action.path, st, ack["sha256"], ack.get("mtime")))
        self._done(result, action)

    async def _download(self, action: Action, result: RunResult) -> None:
        """Fetch into the partial file, verify, then put it in place (see the module doc)."""
        from wsfiles.client import CHECKSUM_MISMATCH, WsfilesError

        # File creation and fsync cost a fraction of a millisecond each here:
        # in a thread, they overlap the next download's network time.
        partial, sink = await threads.deferToThread(
            _open_partial, self.root, action.path, action.size
        )
        try:
            try:
                sent = await self.client.download(
                    remote_name(self.base, action.path),
                    sink,
                    resume=True,
                    progress=self._moved(action.path),
                    pipelined=True,
                )
            except WsfilesError as e:
                if e.code in (CHECKSUM_MISMATCH, "not_found"):  # its bytes are of no use
                    sink.close()
                    partial.unlink(missing_ok=True)
                raise
            listed = self.remote.get(action.path)
            mtime = listed.mtime if listed is not None else None
            target = local_path(self.root, action.path)
            self._make_folder(target.parent)
            # Made durable with the server's mtime, then put in place, in a
            # thread: file-system calls cost a fraction of a millisecond each
            # here, and the next downloads' bytes keep coming meanwhile.
            landed, copy, st = await threads.deferToThread(
                _land, sink, partial, mtime, self.root, action, self.local.get(action.path)
            )
        finally:
            sink.close()
        if not landed or st is None:
            self._retry(result, action.path, "a local folder has this name")
            return
        if copy is not None:
            result.conflicts.append((action.path, copy))
            self.emit({"event": "conflict", "path": action.path, "copy": copy})
        self._record_soon(_synced(action.path, st, sent["sha256"], mtime))
        self._done(result, action)

    def _record_soon(self, synced: Synced) -> None:
        """Record a download's row with the next few (one commit for many).

        A row lost in a crash is harmless: the next plan finds the same
        content on both sides and only records it (``RECORD``).  Rows are
        committed every :data:`RECORDS_AT_ONCE` and when the run ends,
        however it ends (Ctrl-C included).
        """
        self._pending_rows.append(synced)
        if len(self._pending_rows) >= RECORDS_AT_ONCE:
            self._flush_rows()

    def _flush_rows(self) -> None:
        rows, self._pending_rows = self._pending_rows, []
        if rows:
            # The downloads' renames are made durable before the state says
            # they happened: after a power loss a row for a rename the disk
            # lost would read as a local delete, and delete the server's copy.
            for folder in {local_path(self.root, row.path).parent for row in rows}:
                _fsync_folder(folder)
            with self.state.batch():
                for row in rows:
                    self.state.record(row)

    def _make_folder(self, folder: Path) -> None:
        """Create ``folder`` under the root; never write through a symlink out of it.

        Checked once per folder and run (a symlink swapped in meanwhile by
        the user is their own doing; ours never are)."""
        if folder in self._folders_made:
            return
        folder.mkdir(parents=True, exist_ok=True)
        real = os.path.realpath(folder)
        root = os.path.realpath(self.root)
        if real != root and not real.startswith(root + os.sep):
            raise OSError(0, f"a symlink leads out of {self.root}", str(folder))
        self._folders_made.add(folder)

    async def _delete_local(self, action: Action, result: RunResult) -> None:
        target = local_path(self.root, action.path)
        current = _lstat(target)
        synced = self.state.get(action.path)
        if current is None:
            self.state.forget(action.path)
            self._done(result, action)
            return
        if synced is None or not _same(
            current, synced.size, synced.local_mtime_ns, synced.local_inode
        ):
            self._retry(result, action.path, "the local file changed since it was synced")
            return
        os.unlink(target)
        self.state.forget(action.path)
        self._prune(target.parent)
        self._done(result, action)

    def _prune(self, folder: Path) -> None:
        """Remove the folders a local delete left empty, up to the root."""
        root = self.root.resolve()
        while folder.resolve() != root and root in folder.resolve().parents:
            try:
                folder.rmdir()
            except OSError:
                return
            self._folders_made.discard(folder)
            folder = folder.parent

    async def _delete_remote(self, action: Action, result: RunResult) -> None:
        from wsfiles.client import WsfilesError

        if _lstat(local_path(self.root, action.path)) is not None:
            self._retry(result, action.path, "the local file is back")
            return
        try:
            await self.client.delete(
                remote_name(self.base, action.path), if_sha256=action.expect_remote_sha256
            )
        except WsfilesError as e:
            if e.code != "not_found":
                raise
        self.state.forget(action.path)
        self._done(result, action)

    async def _rename_remote(self, action: Action, result: RunResult) -> None:
        assert action.to is not None
        moved = _lstat(local_path(self.root, action.to))
        if moved is None or _lstat(local_path(self.root, action.path)) is not None:
            self._retry(result, action.path, "the local rename changed since the scan")
            return
        await self.client.rename(
            remote_name(self.base, action.path), remote_name(self.base, action.to)
        )
        listed = self.remote.get(action.path)
        synced = self.state.get(action.path)
        sha256 = action.sha256 or (synced.sha256 if synced else None)
        self.state.forget(action.path)
        if sha256 is not None:
            self.state.record(
                _synced(action.to, moved, sha256, listed.mtime if listed is not None else None)
            )
        self._done(result, action)

    async def _rename_local(self, action: Action, result: RunResult) -> None:
        assert action.to is not None
        source = local_path(self.root, action.path)
        target = local_path(self.root, action.to)
        current = _lstat(source)
        synced = self.state.get(action.path)
        if (
            current is None
            or synced is None
            or not _same(current, synced.size, synced.local_mtime_ns, synced.local_inode)
        ):
            self._retry(result, action.path, "the local file changed since it was synced")
            return
        if _lstat(target) is not None:
            self._retry(result, action.path, f"{action.to!r} exists locally")
            return
        self._make_folder(target.parent)
        os.rename(source, target)
        self._prune(source.parent)
        listed = self.remote.get(action.to)
        self.state.forget(action.path)
        self.state.record(
            Synced(
                action.to,
                synced.size,
                synced.sha256,
                synced.local_mtime_ns,
                synced.local_inode,
                listed.mtime if listed is not None else synced.remote_mtime,
            )
        )
        self._done(result, action)

    async def _record(self, action: Action, result: RunResult) -> None:
        self._record_equal(action)
        result.done += 1

    async def _forget(self, action: Action, result: RunResult) -> None:
        self.state.forget(action.path)
        result.done += 1


_TRANSFERS = frozenset({Kind.UPLOAD, Kind.DOWNLOAD, Kind.CONFLICT})
#: Transfers run side by side (a conflict renames a local file first: one at a time).
_PIPELINED = frozenset({Kind.UPLOAD, Kind.DOWNLOAD})
#: Actions that only touch the state: done first, in one transaction.
_STATE_ONLY = frozenset({Kind.RECORD, Kind.FORGET})
_HANDLERS: dict[Kind, Callable[[Runner, Action, RunResult], Any]] = {
    Kind.UPLOAD: Runner._upload,
    Kind.DOWNLOAD: Runner._download,
    Kind.CONFLICT: Runner._download,
    Kind.DELETE_LOCAL: Runner._delete_local,
    Kind.DELETE_REMOTE: Runner._delete_remote,
    Kind.RENAME_REMOTE: Runner._rename_remote,
    Kind.RENAME_LOCAL: Runner._rename_local,
    Kind.RECORD: Runner._record,
    Kind.FORGET: Runner._forget,
}


# -- one round: scan, list, plan, run -----------------------------------------


@dataclass
class Round:
    """One reconcile pass: its plan and, unless a dry run, what running it did."""

    plan: Plan
    result: RunResult | None

    @property
    def settled(self) -> bool:
        """Nothing was left to do: only state rows changed, nothing waits or failed."""
        busy = [a for a in self.plan.actions if a.kind not in _STATE_ONLY]
        if busy or self.plan.waiting:
            return False
        return self.result is None or not (self.result.retry or self.result.failed)


class Syncer:
    """Reconciles one local root with one remote folder, a round at a time."""

    def __init__(
        self,
        client: Any,
        root: Path,
        base: str,
        state: Any,
        *,
        direction: Direction = "both",
        excludes: Sequence[str] = (),
        emit: Emit | None = None,
        progress: Callable[[], Progress | None] | None = None,
        dry_run: bool = False,
        max_delete: float = MAX_DELETE_PERCENT,
    ) -> None:
        self.client = client
        self.root = root
        self.base = base
        self.state = state
        self.direction: Direction = direction
        self.excludes = list(excludes)
        self.emit: Emit = emit or (lambda event: None)
        self.progress = progress
        self.dry_run = dry_run
        self.max_delete = max_delete
        #: Many deletes the last round put off to look again (wsfiles.sync.guard).
        self._deletes_seen: frozenset[str] = frozenset()
        self._warned: set[tuple[str, str]] = set()

    async def listing(self) -> dict[str, RemoteFile]:
        """The server's files under the synced folder, with their SHA-256."""
        from wsfiles.client import WsfilesError
        from wsfiles.client_tree import is_folder, list_folder

        try:  # (pages are commands: a big tree after many deletes may wait)
            entries = await _within_rate(
                lambda: list_folder(self.client, self.base, recursive=True, sha256=True)
            )
        except WsfilesError as e:
            if e.code == "not_found":  # the folder comes with the first upload
                return {}
            raise
        files: dict[str, RemoteFile] = {}
        for entry in entries:
            name = entry.get("name")
            if is_folder(entry) or not isinstance(name, str):
                continue
            if is_excluded(name, self.excludes):
                continue
            files[name] = RemoteFile(
                name, int(entry["size"]), float(entry["mtime"]), entry.get("sha256")
            )
        return files

    async def round(self) -> Round:
        """Scan, list, plan and (unless a dry run) run the plan once."""
        from wsfiles.client_tree import limits

        now = time.time()
        # The server lists while a thread scans (and later plans, which may
        # hash files): the reactor stays free, and the two waits overlap.
        listing = defer.ensureDeferred(self.listing())
        try:
            local, skipped = await threads.deferToThread(
                scan, self.root, self.excludes, limits(self.client), prefix=self.base
            )
        except BaseException:
            listing.cancel()
            listing.addErrback(lambda _: None)
            raise
        remote = await listing
        plan = await threads.deferToThread(
            reconcile,
            local,
            remote,
            self.state.all(),  # (read here: the state's connection is this thread's)
            lambda path: local_sha256(self.root, path),
            self.direction,
            now,
            short_host(),
            skipped=skipped,
            excludes=self.excludes,
        )
        for path, reason in plan.skipped:
            if (path, reason) not in self._warned:
                self._warned.add((path, reason))
                self.emit({"event": "skipped", "path": path, "reason": reason})
        if self.dry_run:
            for action in plan.actions:
                if action.kind not in _STATE_ONLY:
                    self.emit({"event": "plan", **action_fields(action)})
        else:
            deleting, seen = big_deletes(plan), self._deletes_seen
            self._deletes_seen = deleting
            if deleting and deleting != seen:  # look again after the quiet time
                return Round(Plan([], plan.skipped, sorted(deleting)), None)
        check_deletes(plan, len(local), len(remote), self.max_delete)  # (a dry run says so too)
        if self.dry_run:
            return Round(plan, None)
        runner = Runner(
            self.client,
            self.root,
            self.base,
            self.state,
            emit=self.emit,
            progress=self.progress() if self.progress else None,
        )
        outcome = Round(plan, await runner.run(plan, local, remote))
        if outcome.settled:
            _clear_partials(self.root)
        return outcome


def _clear_partials(root: Path) -> None:
    """Drop partial downloads once in sync: none of them is wanted any more
    (a file deleted on the server after a run was killed mid-download)."""
    folder = partial_dir(root)
    try:
        leftovers = list(folder.iterdir())
    except OSError:
        return
    for leftover in leftovers:
        leftover.unlink(missing_ok=True)


def action_fields(action: Action) -> dict[str, Any]:
    """An action as JSON fields (``--json``, ``--dry-run``)."""
    fields: dict[str, Any] = {"action": action.kind.value, "path": action.path}
    if action.to is not None:
        fields["to"] = action.to
    if action.kind in _TRANSFERS:
        fields["size"] = action.size
    return fields
