"""Reconcile: the local scan, the server's listing and the sync state -> a plan.

:func:`reconcile` is a pure function (no I/O): the caller hands it the scan
(:func:`wsfiles.sync.localtree.scan`), the listing (``list`` with ``sha256``),
the state rows and a callable that hashes one local file.  That callable is
called only for local files whose size, mtime or inode differ from the state
(or that have no state row and are needed for a comparison), so a run over an
unchanged tree reads no file at all.

The rules, for each path (``state`` = what both sides held at the last sync):

- Equal content on both sides is never sent again: only the state is recorded
  (``RECORD``), also on the first sync.
- A change on one side since the last sync is carried to the other
  (``UPLOAD``/``DOWNLOAD``); a server entry without a SHA-256 counts as
  unchanged when its size equals the state's.
- Deletes propagate only for paths that were in sync (have a state row) and
  are unchanged on the other side (``DELETE_LOCAL``/``DELETE_REMOTE``).  A file
  on one side only and never synced is copied, never deleted.
- Delete against modify: the modified side wins, the file is restored.  For a
  local delete or rename, "unchanged" means size, mtime and inode exactly as
  last synced (what the runner checks again just before it acts): a file
  merely touched here is kept and restored on the server.
- Conflict (both sides changed since the last sync and contents differ, or
  never synced and different, or never synced and the server gave no SHA-256
  to compare): the server's copy keeps the name; the local copy is
  renamed ``NAME (conflict HOST YYYY-MM-DD HHMMSS).EXT`` (this machine's short
  host name and local time; `` 2``, `` 3``... before the ``)`` if taken; at most
  255 bytes, the stem shortened) (``CONFLICT``, which
  then downloads the server's copy) and uploaded under that name, so both
  sides end up with both.  Nothing is lost.
- Renames: a synced local file gone from its path while a new local file with
  the same SHA-256 appeared is renamed on the server (``RENAME_REMOTE``); the
  mirror case seen in the listing renames the local file (``RENAME_LOCAL``).
  With several candidates, the same inode, then the same base name, then path
  order decide.
- A path gone from both sides only drops its state row (``FORGET``).
- Directions: ``up`` changes only the server (it never touches a local file:
  no download, local delete, local rename or conflict rename; a conflict is
  left alone with a warning); ``down`` changes only local files (it never
  touches the server's: no upload, server delete or server rename; a conflict
  still keeps both, the local copy renamed).  Changes made on the other side
  are left alone, not undone.
- Local files modified less than ``quiet`` seconds (2 s) before ``now`` are
  being written: left alone this time (``Plan.waiting``), planned again later
  (unless their stat data is exactly the state's: a file just synced).
- Names the scan skipped (symlinks, special files, refused names, unreadable
  folders) and ``--exclude`` matches are left alone on both sides: a skipped
  local entry is not read as deleted.  A path that is a file on one side and a
  folder on the other is left alone with a warning.

Folders are not synced as such: a folder exists on a side because a file in it
does.  Folders are created as files need them; an empty folder is not copied;
a local folder that a sync delete or rename leaves empty is removed (the
server's empty folders are left as they are, and not copied back).

Actions come in a fixed order: renames (local, then server), conflicts,
deletes, downloads, uploads, records, forgets; by path within each kind.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime

from wsfiles.client_tree import MAX_NAME_BYTES
from wsfiles.sync.localtree import (
    EMPTY_SHA256,
    QUIET_SECONDS,
    Excluder,
    conflict_name,
    is_quiet,
)
from wsfiles.sync.model import Action, Direction, Kind, LocalFile, Plan, RemoteFile, Synced

_ORDER = {
    kind: rank
    for rank, kind in enumerate(
        [
            Kind.RENAME_LOCAL,
            Kind.RENAME_REMOTE,
            Kind.CONFLICT,
            Kind.DELETE_LOCAL,
            Kind.DELETE_REMOTE,
            Kind.DOWNLOAD,
            Kind.UPLOAD,
            Kind.RECORD,
            Kind.FORGET,
        ]
    )
}
#: Kinds that change local files (left out by ``up``).
CHANGES_LOCAL = frozenset({Kind.DOWNLOAD, Kind.DELETE_LOCAL, Kind.RENAME_LOCAL, Kind.CONFLICT})
#: Kinds that change the server's files (left out by ``down``).
CHANGES_REMOTE = frozenset({Kind.UPLOAD, Kind.DELETE_REMOTE, Kind.RENAME_REMOTE})
#: Above this many (source, target) pairs of one digest, renames pair in path order.
_PAIRING_LIMIT = 10_000


class _Unreadable(Exception):
    """A local file could not be hashed (gone, or unreadable)."""


def folders_of(paths: Iterable[str]) -> set[str]:
    """Every folder holding one of ``paths`` (``a`` and ``a/b`` for ``a/b/c``)."""
    folders: set[str] = set()
    for path in paths:
        end = path.rfind("/")
        while end > 0:
            folder = path[:end]
            if folder in folders:
                break
            folders.add(folder)
            end = path.rfind("/", 0, end)
    return folders


def _within(path: str, roots: set[str]) -> bool:
    """``path`` is in ``roots`` or below one of them."""
    if not roots:
        return False
    if path in roots:
        return True
    end = path.rfind("/")
    while end > 0:
        if path[:end] in roots:
            return True
        end = path.rfind("/", 0, end)
    return False


def _base(path: str) -> str:
    return path.rpartition("/")[2]


def _pair(
    sources: list[tuple[str, str, int | None]],
    targets: list[tuple[str, str, int | None]],
) -> list[tuple[str, str]]:
    """Match (path, sha256, inode) sources to targets of the same digest.

    Preference: same inode, then same base name, then path order; each path
    is used once.
    """
    by_sha: dict[str, tuple[list[tuple[str, int | None]], list[tuple[str, int | None]]]] = {}
    for path, sha, inode in sources:
        by_sha.setdefault(sha, ([], []))[0].append((path, inode))
    for path, sha, inode in targets:
        if sha in by_sha:
            by_sha[sha][1].append((path, inode))
    pairs: list[tuple[str, str]] = []
    for sha in sorted(by_sha):
        froms, tos = (sorted(side) for side in by_sha[sha])
        if not tos:
            continue
        if len(froms) * len(tos) > _PAIRING_LIMIT:
            pairs.extend((a, b) for (a, _), (b, _) in zip(froms, tos, strict=False))
            continue
        ranked = sorted(
            (
                (
                    not (inode_a is not None and inode_a == inode_b),
                    _base(a) != _base(b),
                    a,
                    b,
                )
                for a, inode_a in froms
                for b, inode_b in tos
            )
        )
        used: set[str] = set()
        for _, _, a, b in ranked:
            if a not in used and b not in used:
                used.update((a, b))
                pairs.append((a, b))
    return pairs


def _remote_same(listed: RemoteFile, synced: Synced) -> bool:
    """The server's file is still what was synced (by size if it gave no SHA-256)."""
    if listed.sha256 is not None:
        return listed.sha256 == synced.sha256
    return listed.size == synced.size


def _stat_same(found: LocalFile, synced: Synced) -> bool:
    return (found.size, found.mtime_ns, found.inode) == (
        synced.size,
        synced.local_mtime_ns,
        synced.local_inode,
    )


def reconcile(
    local: Mapping[str, LocalFile],
    remote: Mapping[str, RemoteFile],
    state: Mapping[str, Synced],
    local_sha256: Callable[[str], str],
    direction: Direction,
    now: float,
    host: str,
    *,
    skipped: Sequence[tuple[str, str]] = (),
    excludes: Sequence[str] = (),
    quiet: float = QUIET_SECONDS,
    max_name: int = MAX_NAME_BYTES,
    when: datetime | None = None,
) -> Plan:
    """The actions that bring both sides in sync (see the module doc for the rules).

    ``local``: the scan; ``remote``: the listing's files by path (relative to
    the synced folder); ``state``: :meth:`SyncState.all`; ``local_sha256(path)``
    hashes one local file (an OSError leaves that path for later);
    ``direction``: ``both``, ``up`` or ``down``; ``now``: the time (seconds since
    the epoch) the scan was made, for the quiet rule and the conflict names
    (``when`` overrides the latter); ``host``: this machine's name, for
    conflict names; ``skipped``: the scan's warnings (the local side of those
    paths, and of everything below them, is unknown); ``excludes``: globs
    left alone on both sides.  ``Plan.skipped`` is ``skipped`` followed by the
    plan's own warnings.
    """
    planner = _Planner(
        local,
        remote,
        state,
        local_sha256,
        direction,
        now,
        host,
        skipped=skipped,
        excludes=excludes,
        quiet=quiet,
        max_name=max_name,
        when=when,
    )
    return planner.plan()


class _Planner:
    """One reconcile pass (the state of the computation, not kept afterwards)."""

    def __init__(
        self,
        local: Mapping[str, LocalFile],
        remote: Mapping[str, RemoteFile],
        state: Mapping[str, Synced],
        local_sha256: Callable[[str], str],
        direction: Direction,
        now: float,
        host: str,
        *,
        skipped: Sequence[tuple[str, str]],
        excludes: Sequence[str],
        quiet: float,
        max_name: int,
        when: datetime | None,
    ) -> None:
        if direction not in ("both", "up", "down"):
            raise ValueError(f"direction must be 'both', 'up' or 'down', not {direction!r}")
        if excludes:
            excluded = Excluder(excludes)
            local = {p: f for p, f in local.items() if not excluded(p)}
            remote = {p: f for p, f in remote.items() if not excluded(p)}
            state = {p: s for p, s in state.items() if not excluded(p)}
        self.local = local
        self.remote = remote
        self.state = state
        self.hash = local_sha256
        self.direction = direction
        self.host = host
        self.max_name = max_name
        self.when = when if when is not None else datetime.fromtimestamp(now)
        self.actions: list[Action] = []
        self.warnings: list[tuple[str, str]] = list(skipped)
        # Being written: modified within `quiet` of `now`.  A file exactly as last
        # synced (a fresh download carries a recent mtime) is known, never waiting.
        self.waiting: list[str] = sorted(
            p
            for p, found in local.items()
            if not is_quiet(found, now, quiet) and not (p in state and _stat_same(found, state[p]))
        )
        # Paths whose local side is unknown this time (and everything below them).
        self.unknown = {path for path, _ in skipped} | set(self.waiting)
        self.clashes = (set(local) & folders_of(remote)) | (set(remote) & folders_of(local))
        for path in sorted(self.clashes):
            self.warnings.append((path, "a file on one side and a folder on the other: left alone"))
        self.digests: dict[str, str] = {}
        self.done: set[str] = set()  # paths already decided (renames, failures)
        self.names: set[str] = set()  # conflict names given in this plan

    # -- helpers -----------------------------------------------------------

    def blocked(self, path: str) -> bool:
        return _within(path, self.unknown) or _within(path, self.clashes)

    def digest(self, path: str) -> str:
        """The local file's SHA-256: from the state if its stat data is unchanged."""
        known = self.digests.get(path)
        if known is not None:
            return known
        found = self.local[path]
        synced = self.state.get(path)
        if synced is not None and _stat_same(found, synced):
            sha = synced.sha256
        elif found.size == 0:
            sha = EMPTY_SHA256
        else:
            try:
                sha = self.hash(path)
            except FileNotFoundError:
                self.waiting.append(path)
                self.done.add(path)
                raise _Unreadable from None
            except OSError as e:
                self.warnings.append((path, f"cannot read it: {e.strerror or e}"))
                self.done.add(path)
                raise _Unreadable from None
        self.digests[path] = sha
        return sha

    def add(
        self,
        kind: Kind,
        path: str,
        *,
        to: str | None = None,
        sha256: str | None = None,
        expect_remote_sha256: str | None = None,
        size: int = 0,
    ) -> None:
        """Append an action, unless the direction forbids its side."""
        if self.direction == "up" and kind in CHANGES_LOCAL:
            return
        if self.direction == "down" and kind in CHANGES_REMOTE:
            return
        self.actions.append(Action(kind, path, to, sha256, expect_remote_sha256, size))

    def taken(self, path: str) -> bool:
        return path in self.local or path in self.remote or path in self.state or path in self.names

    # -- the pass ----------------------------------------------------------

    def plan(self) -> Plan:
        if self.direction != "down":
            self.local_renames()
        if self.direction != "up":
            self.remote_renames()
        for path in sorted(set(self.local) | set(self.remote) | set(self.state)):
            if path in self.done or self.blocked(path):
                continue
            try:
                self.decide(path)
            except _Unreadable:
                continue
        self.actions.sort(key=lambda a: (_ORDER[a.kind], a.path))
        return Plan(self.actions, self.warnings, sorted(set(self.waiting)))

    def local_renames(self) -> None:
        """Synced files gone locally (server copy unchanged) that reappeared elsewhere."""
        sources = [
            (path, synced.sha256, synced.local_inode)
            for path, synced in self.state.items()
            if path not in self.local
            and path in self.remote
            and not self.blocked(path)
            and _remote_same(self.remote[path], synced)
        ]
        if not sources:
            return
        sizes = {self.state[path].size for path, _, _ in sources}
        targets = []
        for path, found in self.local.items():
            if (
                path in self.state
                or path in self.remote
                or found.size not in sizes
                or self.blocked(path)
            ):
                continue
            try:
                targets.append((path, self.digest(path), found.inode))
            except _Unreadable:
                continue
        for old, new in _pair(sources, targets):
            sha = self.state[old].sha256
            self.add(
                Kind.RENAME_REMOTE,
                old,
                to=new,
                sha256=sha,
                expect_remote_sha256=sha,
                size=self.local[new].size,
            )
            self.done.update((old, new))

    def remote_renames(self) -> None:
        """Synced files gone from the server (local copy unchanged) listed under a new path."""
        candidates = [
            (path, synced)
            for path, synced in self.state.items()
            if path in self.local
            and path not in self.remote
            and not self.blocked(path)
            and _stat_same(self.local[path], synced)
        ]
        shas = {synced.sha256 for _, synced in candidates}
        targets = [
            (path, listed.sha256, None)
            for path, listed in self.remote.items()
            if listed.sha256 in shas
            and path not in self.state
            and path not in self.local
            and not self.blocked(path)
        ]
        if not targets:
            return
        sources = [(path, synced.sha256, None) for path, synced in candidates]
        for old, new in _pair(sources, targets):  # type: ignore[arg-type]
            sha = self.state[old].sha256
            self.add(Kind.RENAME_LOCAL, old, to=new, sha256=sha, size=self.remote[new].size)
            self.done.update((old, new))

    def decide(self, path: str) -> None:
        found = self.local.get(path)
        listed = self.remote.get(path)
        synced = self.state.get(path)
        if found is not None and listed is not None:
            self.both_present(path, found, listed, synced)
        elif found is not None:
            if synced is None:
                # New here, never synced: copied.  Not hashed now unless a rename
                # check already did (the runner learns the digest from the ack).
                self.add(Kind.UPLOAD, path, sha256=self.digests.get(path), size=found.size)
            elif _stat_same(found, synced):
                self.add(Kind.DELETE_LOCAL, path, size=found.size)  # deleted on the server
            else:  # deleted on the server, modified (or touched) here: restored
                self.add(Kind.UPLOAD, path, sha256=self.digests.get(path), size=found.size)
        elif listed is not None:
            if synced is None or not _remote_same(listed, synced):
                # New on the server, or modified there and deleted here: copied.
                self.add(
                    Kind.DOWNLOAD,
                    path,
                    sha256=listed.sha256,
                    expect_remote_sha256=listed.sha256,
                    size=listed.size,
                )
            else:  # deleted here, unchanged on the server
                self.add(
                    Kind.DELETE_REMOTE,
                    path,
                    expect_remote_sha256=listed.sha256 or synced.sha256,
                    size=listed.size,
                )
        else:
            self.add(Kind.FORGET, path)

    def both_present(
        self, path: str, found: LocalFile, listed: RemoteFile, synced: Synced | None
    ) -> None:
        local_sha = self.digest(path)
        if listed.sha256 is not None and listed.sha256 == local_sha:
            if synced is None or synced.sha256 != local_sha or not _stat_same(found, synced):
                self.add(Kind.RECORD, path, sha256=local_sha, size=found.size)
            return
        if synced is None:
            self.conflict(path, found, listed, local_sha)
            return
        local_changed = local_sha != synced.sha256
        remote_changed = not _remote_same(listed, synced)
        if not local_changed and not remote_changed:
            if not _stat_same(found, synced):  # touched, same content
                self.add(Kind.RECORD, path, sha256=synced.sha256, size=found.size)
        elif not remote_changed:
            self.add(
                Kind.UPLOAD,
                path,
                sha256=local_sha,
                expect_remote_sha256=listed.sha256 or synced.sha256,
                size=found.size,
            )
        elif not local_changed:
            self.add(
                Kind.DOWNLOAD,
                path,
                sha256=listed.sha256,
                expect_remote_sha256=listed.sha256,
                size=listed.size,
            )
        else:
            self.conflict(path, found, listed, local_sha)

    def conflict(self, path: str, found: LocalFile, listed: RemoteFile, local_sha: str) -> None:
        """The server's copy keeps the name; the local one is renamed, then uploaded."""
        if self.direction == "up":
            self.warnings.append(
                (path, "changed on both sides: left alone (up-only never changes local files)")
            )
            return
        name = conflict_name(path, self.host, self.when, self.max_name, self.taken)
        self.names.add(name)
        self.add(
            Kind.CONFLICT,
            path,
            to=name,
            sha256=listed.sha256,
            expect_remote_sha256=listed.sha256,
            size=listed.size,
        )
        self.add(Kind.UPLOAD, name, sha256=local_sha, size=found.size)
