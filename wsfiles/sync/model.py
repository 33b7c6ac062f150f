"""Plain records shared by every part of ``wsfiles sync`` (no I/O here).

Paths are POSIX paths relative to the sync root on the local side and to the
synced server folder on the remote side, e.g. ``"a/b.txt"``: the same string
names the same file on both sides.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Literal

#: ``both`` mirrors both ways; ``up`` only changes the server (never touches local
#: files); ``down`` only changes local files (never touches the server's).
Direction = Literal["both", "up", "down"]


@dataclass(frozen=True)
class LocalFile:
    """A regular file found by the local scan: its stat data, not its content."""

    path: str  # posix path relative to the sync root, e.g. "a/b.txt"
    size: int
    mtime_ns: int
    inode: int


@dataclass(frozen=True)
class RemoteFile:
    """A file entry of the server's recursive listing."""

    path: str
    size: int
    mtime: float
    sha256: str | None  # None when the server did not say (compared by size then)


@dataclass(frozen=True)
class Synced:
    """What both sides held when this path was last in sync (one state row).

    The local stat data (mtime, inode) lets the next run tell an unchanged
    local file without hashing it; the sha256 tells deletes and renames apart.
    """

    path: str
    size: int
    sha256: str
    local_mtime_ns: int
    local_inode: int
    remote_mtime: float


class Kind(enum.Enum):
    """What one action does."""

    UPLOAD = "upload"  # local -> server (if_sha256 = state's sha256, or if_absent)
    DOWNLOAD = "download"  # server -> local (via a partial file, verified, then renamed over)
    DELETE_LOCAL = "delete_local"
    DELETE_REMOTE = "delete_remote"  # with if_sha256
    CONFLICT = "conflict"  # local loser renamed to `conflict_name`, then server copy downloaded
    RECORD = "record"  # both sides already equal: only the state is updated
    RENAME_REMOTE = "rename_remote"  # local rename detected (same sha256): rename on the server
    RENAME_LOCAL = "rename_local"  # server rename detected (same sha256): rename the local file
    FORGET = "forget"  # gone from both sides: only the state row is dropped


@dataclass(frozen=True)
class Action:
    """One step of a plan; the runner checks its preconditions before acting."""

    kind: Kind
    path: str
    to: str | None = None  # renames and conflicts: the new name
    sha256: str | None = None  # the content expected after the action
    expect_remote_sha256: str | None = None  # precondition for server-side changes
    size: int = 0


@dataclass
class Plan:
    """The actions of one reconcile pass, in the order to run them, and its warnings."""

    actions: list[Action]
    skipped: list[tuple[str, str]]  # (path, reason) warnings, e.g. names the server refuses
    # Local files still being written (mtime too recent) or gone while planning:
    # left alone this time; plan again after the quiet time.
    waiting: list[str] = field(default_factory=list)
