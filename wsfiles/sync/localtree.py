"""The local side of ``wsfiles sync``: scan, name filtering, excludes, stability, conflict names.

What is synced from the local folder: regular files only, found by an
``os.scandir`` walk that never follows symbolic links.  Skipped, each with a
warning (``skipped``): symbolic links, special files (FIFOs, sockets, devices),
folders that cannot be read, and names the server would refuse (the rules of
docs/protocol.md "Names" and "Paths", checked with
:func:`wsfiles.client_tree.check_path` and the server's ``max_path`` /
``max_depth``): names starting with ``.wsfiles-``, backslashes, control
characters, names that are not valid UTF-8, names over 255 bytes, paths too
long or too deep.  Skipped silently: the state folder ``.wsfiles-sync`` at the
root, and whatever matches an ``--exclude`` glob.

Excludes: each glob is matched (``fnmatch.fnmatchcase``, case-sensitive; ``*``
also matches ``/``) against both the path relative to the sync root
(``docs/draft.txt``) and the base name (``draft.txt``).  A glob that matches a
folder excludes everything below it (``--exclude node_modules``).  The same
rule applies to the server's side (:func:`is_excluded`).

Permissions, owners and extended attributes are not synced; only content and
modification time (the server keeps the mtime a file was saved with).
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import os
import re
import socket
import stat
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from pathlib import Path

from wsfiles.client_tree import (
    MAX_DEPTH,
    MAX_NAME_BYTES,
    MAX_PATH,
    PathError,
    check_path,
    check_segment,
)
from wsfiles.sync.model import LocalFile
from wsfiles.sync.state import STATE_DIR

#: A local file modified less than this long ago is still being written: not uploaded yet.
QUIET_SECONDS = 2.0
#: The SHA-256 of no bytes: empty files are never read.
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
_CHUNK = 1 << 20
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
#: Bound on ``" 2"``, ``" 3"``... tried when a conflict name is taken.
MAX_CONFLICT_TRIES = 1000


def display(name: str) -> str:
    """``name`` safe to print: bytes that are not UTF-8 and control characters as escapes.

    Names the server accepts come back unchanged (it refuses both kinds).
    """
    text = name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)


def is_excluded(path: str, excludes: Sequence[str]) -> bool:
    """Whether ``path`` (or one of its folders) matches an exclude glob.

    Each glob is tried on the relative path and on the base name of ``path``
    and of every folder above it, so ``build`` excludes ``build/x/y.o``.
    """
    return bool(excludes) and Excluder(excludes)(path)


class Excluder:
    """:func:`is_excluded` for many paths: each folder's answer is remembered."""

    def __init__(self, excludes: Sequence[str]) -> None:
        self.excludes = tuple(excludes)
        self._folders: dict[str, bool] = {}

    def __call__(self, path: str) -> bool:
        if not self.excludes:
            return False
        folder, _, name = path.rpartition("/")
        if folder and self._folder(folder):
            return True
        return _matches(path, name, self.excludes)

    def _folder(self, folder: str) -> bool:
        known = self._folders.get(folder)
        if known is None:
            known = self(folder)
            self._folders[folder] = known
        return known


def _matches(path: str, name: str, excludes: Sequence[str]) -> bool:
    match = _compiled(tuple(excludes)).match
    return match(path) is not None or match(name) is not None


@functools.lru_cache(maxsize=16)
def _compiled(excludes: tuple[str, ...]) -> re.Pattern[str]:
    """All globs as one regular expression (``fnmatch.fnmatchcase`` semantics)."""
    return re.compile("|".join(f"(?:{fnmatch.translate(glob)})" for glob in excludes))


def _join(prefix: str, path: str) -> str:
    return f"{prefix}/{path}" if prefix else path


def scan(
    root: str | os.PathLike[str],
    excludes: Sequence[str] = (),
    limits: Mapping[str, int] | None = None,
    *,
    prefix: str = "",
) -> tuple[dict[str, LocalFile], list[tuple[str, str]]]:
    """Every syncable regular file under ``root``, and the (path, reason) warnings.

    ``limits`` are the server's (``wsfiles.client_tree.limits(client)``:
    ``max_path``, ``max_depth``); ``prefix`` is the remote folder the root maps
    to, since the server checks the whole path ``prefix/path``.  A skipped
    folder is reported once (its path), not file by file.  Files that vanish
    during the scan are left out without a warning.  Raises OSError if
    ``root`` itself cannot be listed, PathError if ``prefix`` is not a valid path.
    """
    max_path = (limits or {}).get("max_path", MAX_PATH)
    max_depth = (limits or {}).get("max_depth", MAX_DEPTH)
    if prefix:
        check_path(prefix, max_path=max_path, max_depth=max_depth)
    files: dict[str, LocalFile] = {}
    skipped: list[tuple[str, str]] = []
    top = os.fspath(root)
    # (folder on disk, its path relative to root); bounded by the tree itself
    # (symlinks are never followed, so no cycles).
    stack: list[tuple[str, str]] = [(top, "")]
    while stack:
        folder, rel_folder = stack.pop()
        try:
            with os.scandir(folder) as entries:
                listed = list(entries)
        except OSError as e:
            if not rel_folder:
                raise  # the root itself: nothing can be planned (never "all deleted")
            if isinstance(e, FileNotFoundError):
                continue
            skipped.append((display(rel_folder), f"cannot read folder: {e.strerror}"))
            continue
        for entry in listed:
            name = entry.name
            rel = _join(rel_folder, name)
            if not rel_folder and name == STATE_DIR:
                continue
            try:
                name.encode("utf-8")
            except UnicodeEncodeError:
                skipped.append((display(rel), "name is not valid UTF-8"))
                continue
            if excludes and _matches(rel, name, excludes):  # (folders were checked above)
                continue
            try:
                if entry.is_symlink():
                    skipped.append((display(rel), "symbolic link (not followed)"))
                    continue
                is_dir = entry.is_dir(follow_symlinks=False)
                is_file = not is_dir and entry.is_file(follow_symlinks=False)
            except OSError:
                continue
            if not is_dir and not is_file:
                skipped.append((display(rel), "special file (FIFO, socket or device)"))
                continue
            try:
                _check(_join(prefix, rel), name, max_path, max_depth)
            except PathError as e:
                # A refused folder is reported once, not file by file.
                skipped.append((display(rel), f"the server would refuse it: {e}"))
                continue
            if is_dir:
                stack.append((entry.path, rel))
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if not stat.S_ISREG(st.st_mode):  # replaced by something else meanwhile
                continue
            files[rel] = LocalFile(rel, st.st_size, st.st_mtime_ns, st.st_ino)
    skipped.sort()
    return files, skipped


def _check(full: str, name: str, max_path: int, max_depth: int) -> None:
    """:func:`check_path` for a path whose folders were checked already: the new
    name, then the depth and length (the full check only to word a refusal)."""
    check_segment(name)
    if full.count("/") >= max_depth or len(full.encode("utf-8")) > max_path:
        check_path(full, max_path=max_path, max_depth=max_depth)


def local_path(root: str | os.PathLike[str], path: str) -> Path:
    """The file on disk for sync path ``path`` (``/``-separated) under ``root``."""
    return Path(root).joinpath(*path.split("/"))


def local_sha256(root: str | os.PathLike[str], path: str) -> str:
    """The SHA-256 (hex) of local file ``path``, read in 1 MiB pieces.

    Raises OSError if the file cannot be read (the planner treats a vanished
    file as "plan again later").  Never follows a symlink at the last step.
    """
    fd = os.open(local_path(root, path), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    digest = hashlib.sha256()
    with os.fdopen(fd, "rb", buffering=0) as source:
        while chunk := source.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def is_quiet(file: LocalFile, now: float, quiet: float = QUIET_SECONDS) -> bool:
    """Whether ``file`` may be uploaded: not modified within ``quiet`` seconds of ``now``.

    A file being written keeps getting a fresh mtime; once it has been left
    alone for ``quiet`` seconds (2 s by default) it is taken as finished.  An
    mtime far in the future (a clock set wrong, an unpacked archive) does not
    hold a file back forever: only ``|now - mtime| < quiet`` counts as busy.
    """
    age = now - file.mtime_ns / 1e9
    return not (-quiet < age < quiet)


def is_stable(
    root: str | os.PathLike[str], path: str, now: float, quiet: float = QUIET_SECONDS
) -> bool:
    """:func:`is_quiet` on the file's current stat data (False if it is gone or not a file)."""
    try:
        st = os.lstat(local_path(root, path))
    except OSError:
        return False
    if not stat.S_ISREG(st.st_mode):
        return False
    return is_quiet(LocalFile(path, st.st_size, st.st_mtime_ns, st.st_ino), now, quiet)


def _cut(text: str, max_bytes: int) -> str:
    """``text`` shortened to at most ``max_bytes`` of UTF-8, on a code-point boundary."""
    if max_bytes <= 0:
        return ""
    return text.encode("utf-8")[:max_bytes].decode("utf-8", "ignore")


def _split_ext(name: str) -> tuple[str, str]:
    """``("report", ".pdf")``; no extension for ``.bashrc`` or ``name.``."""
    dot = name.rfind(".")
    if dot <= 0 or dot == len(name) - 1:
        return name, ""
    return name[:dot], name[dot:]


def _clean_host(host: str) -> str:
    """The host name as used in a name: no separators or control characters."""
    cleaned = "".join(
        "-" if ch in "/\\" or ord(ch) < 32 or 127 <= ord(ch) < 160 else ch for ch in host
    )
    cleaned = cleaned.strip()
    return cleaned or "unknown"


def short_host() -> str:
    """This machine's host name without its domain (``laptop`` for ``laptop.example.org``)."""
    return socket.gethostname().split(".")[0]


def conflict_name(
    path: str,
    host: str | None = None,
    when: datetime | None = None,
    max_name: int = MAX_NAME_BYTES,
    taken: Callable[[str], bool] | None = None,
) -> str:
    """The path for the losing copy of ``path``: ``NAME (conflict HOST YYYY-MM-DD HHMMSS).EXT``.

    Only the last segment changes.  The name never exceeds ``max_name`` bytes
    of UTF-8: the stem is shortened first (on code-point boundaries), then the
    host; the extension is kept unless it alone leaves no room.  If ``taken``
    says a candidate exists, `` 2``, `` 3``... is added inside the parentheses
    (at most :data:`MAX_CONFLICT_TRIES` tries, then ValueError).
    """
    folder, _, name = path.rpartition("/")
    host = _clean_host(short_host() if host is None else host)
    stamp = (when or datetime.now()).strftime("%Y-%m-%d %H%M%S")
    stem, ext = _split_ext(name)
    for number in range(1, MAX_CONFLICT_TRIES + 1):
        counter = "" if number == 1 else f" {number}"
        candidate = _fit(stem, ext, host, f" {stamp}{counter})", max_name)
        if candidate is None:
            candidate = _fit(name, "", host, f" {stamp}{counter})", max_name)
        if candidate is None:
            raise ValueError(f"max_name={max_name} leaves no room for a conflict name")
        full = f"{folder}/{candidate}" if folder else candidate
        if taken is None or not taken(full):
            return full
    raise ValueError(f"no free conflict name for {path!r} after {MAX_CONFLICT_TRIES} tries")


def _fit(stem: str, ext: str, host: str, tail: str, max_name: int) -> str | None:
    """``STEM (conflict HOST TAIL EXT`` within ``max_name`` bytes, or None if even
    one byte of stem and of host do not fit."""
    fixed = len(b" (conflict ") + len(tail.encode()) + len(ext.encode())
    room = max_name - fixed
    stem_bytes = len(stem.encode("utf-8"))
    host_bytes = len(host.encode("utf-8"))
    if stem_bytes + host_bytes > room:
        # The stem is cut first; a long host keeps at least a quarter of the room.
        host = _cut(host, min(host_bytes, max(room - stem_bytes, room // 4, 1)))
        stem = _cut(stem, room - len(host.encode("utf-8")))
        if not stem or not host:
            return None
    return f"{stem} (conflict {host}{tail}{ext}"
