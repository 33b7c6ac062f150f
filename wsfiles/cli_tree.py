"""The ``wsfiles`` command's folder commands (protocol 1.2, ``folders``).

    wsfiles mkdir [-p] URL PATH
    wsfiles rmdir [-r] URL PATH
    wsfiles put -r URL DIR [DEST]     the local tree DIR becomes the server's folder DEST
    wsfiles get -r URL PATH [-o DIR]  the server's folder PATH becomes the local tree DIR

Everything a tree transfer can refuse (a local name the protocol cannot
carry, a path too deep, an output folder that does not exist) is refused
before anything is sent or written.  Names in the server's listing are
checked with the protocol's own rule before they name a local file, and no
file is written through a local symlink that leads out of DIR.  Against a
1.1 server every folder command fails with one line: "this server does not
support folders (protocol 1.2)".

Only the standard library is imported at module level (see wsfiles.cli).
"""

from __future__ import annotations

import argparse
import os
import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from wsfiles.cli import CommandFailed, Interrupted, download_file, preferred_hash

#: How deep a local tree is walked: deeper than any server allows (max_depth).
WALK_DEPTH_LIMIT = 64


def folder_argument(path: str) -> str:
    """A folder as people type it: ``docs/`` is ``docs``; ``/`` (or nothing) is the top."""
    return path.strip("/")


def _checked(path: str, what: str, limits: dict[str, int] | None = None) -> str:
    """``path`` if the protocol allows it, else CommandFailed ``invalid_name``."""
    from wsfiles.client_tree import PathError, check_path

    try:
        return check_path(path, **(limits or {}))
    except PathError as e:
        raise CommandFailed(f"invalid_name: {what}: {e}") from None


def _join(folder: str, name: str) -> str:
    return f"{folder}/{name}" if folder else name


# -- mkdir, rmdir ------------------------------------------------------------------


def _prepare_folder(args: argparse.Namespace) -> None:
    args.path = folder_argument(args.path)
    if not args.path:
        raise CommandFailed("the top folder always exists: name a folder below it")
    _checked(args.path, repr(args.path))


async def _mkdir(client: Any, args: argparse.Namespace) -> None:
    await client.mkdir(args.path, parents=args.parents)


async def _rmdir(client: Any, args: argparse.Namespace) -> None:
    from wsfiles.client import WsfilesError

    try:
        await client.rmdir(args.path, recursive=args.recursive)
    except WsfilesError as e:
        if e.code == "not_empty":
            raise CommandFailed(
                f"not_empty: {args.path!r} is not empty; add -r to remove its whole tree"
            ) from None
        if e.code == "not_a_folder":
            raise CommandFailed(
                f"not_a_folder: {args.path!r} is a file; use 'wsfiles rm'"
            ) from None
        raise


def add_folder_commands(remote: Callable[..., argparse.ArgumentParser]) -> None:
    """Register ``mkdir`` and ``rmdir`` through wsfiles.cli's ``remote`` helper."""
    mkdir = remote(
        "mkdir",
        "create a folder",
        _mkdir,
        _prepare_folder,
        description="Create a folder (a server with folders: protocol 1.2).",
    )
    mkdir.add_argument("path", metavar="PATH", help="the folder, e.g. photos/2026")
    mkdir.add_argument(
        "-p",
        "--parents",
        action="store_true",
        help="create missing parent folders; a folder that exists is fine",
    )
    rmdir = remote(
        "rmdir",
        "remove a folder",
        _rmdir,
        _prepare_folder,
        description="Remove an empty folder; with -r, the folder and everything in it.",
    )
    rmdir.add_argument("path", metavar="PATH", help="the folder")
    rmdir.add_argument(
        "-r", "--recursive", action="store_true", help="remove the whole tree under PATH too"
    )


# -- put -r ------------------------------------------------------------------------


@dataclass
class LocalTree:
    """A local folder's contents, by path relative to it (``/``-separated)."""

    files: list[tuple[str, str, int]] = field(default_factory=list)  # (path, local, size)
    #: Folders with nothing in them: only these need a ``mkdir`` (saves create parents).
    empty_folders: list[str] = field(default_factory=list)
    folders: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @property
    def size(self) -> int:
        return sum(size for _, _, size in self.files)


def scan_tree(top: str) -> LocalTree:
    """Walk ``top`` without following symlinks, in code-point order.

    Symlinks and special files (pipes, sockets, devices) are skipped and
    remembered; a name the protocol cannot carry fails the whole command.
    """
    tree = LocalTree()
    pending: list[tuple[str, str, int]] = [(top, "", 0)]
    while pending:
        local, rel, depth = pending.pop()
        if depth > WALK_DEPTH_LIMIT:
            raise CommandFailed(f"invalid_name: {local} is deeper than {WALK_DEPTH_LIMIT} folders")
        try:
            with os.scandir(local) as listing:
                entries = sorted(listing, key=lambda entry: entry.name)
        except OSError as e:
            raise CommandFailed(f"cannot read {local}: {e.strerror}") from None
        below: list[tuple[str, str, int]] = []
        kept = 0
        for entry in entries:
            path = _join(rel, entry.name)
            try:
                mode = entry.stat(follow_symlinks=False).st_mode
            except OSError as e:
                raise CommandFailed(f"cannot read {entry.path}: {e.strerror}") from None
            if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
                tree.skipped.append(entry.path)
                continue
            _checked(path, f"cannot upload {entry.path}")
            kept += 1
            if stat.S_ISDIR(mode):
                tree.folders.append(path)
                below.append((entry.path, path, depth + 1))
            else:
                tree.files.append((path, entry.path, entry.stat(follow_symlinks=False).st_size))
        if not kept and rel:  # (nothing in it, or only what is skipped)
            tree.empty_folders.append(rel)
        pending.extend(reversed(below))  # depth first, in name order
    tree.files.sort()
    return tree


def prepare_put_tree(args: argparse.Namespace) -> None:
    """``put -r URL DIR [DEST]``: check DIR and every name in it before connecting."""
    if args.name:
        raise CommandFailed("--name does not go with -r: give the folder as DEST")
    if len(args.paths) > 2:
        raise CommandFailed("put -r takes one local folder and at most one DEST")
    local = args.paths[0]
    if not os.path.isdir(local):
        why = "not a folder" if os.path.exists(local) else "no such folder"
        raise CommandFailed(f"cannot read {local}: {why}")
    if len(args.paths) == 2:
        args.dest = folder_argument(args.paths[1])
    else:
        args.dest = os.path.basename(os.path.abspath(local))
    if args.dest:
        _checked(args.dest, f"DEST {args.dest!r}")
    args.tree = scan_tree(local)
    for path in [*args.tree.folders, *(path for path, _, _ in args.tree.files)]:
        _checked(_join(args.dest, path), f"cannot upload {os.path.join(local, path)}")


async def put_tree(client: Any, args: argparse.Namespace) -> None:
    """Create DEST and the empty folders, then upload every file under one progress bar."""
    from twisted.internet.defer import CancelledError

    from wsfiles.cli_format import progress_bar
    from wsfiles.client_tree import limits, require_folders

    require_folders(client)
    tree: LocalTree = args.tree
    dest: str = args.dest
    server_limits = limits(client)
    for path, local, _ in tree.files:
        _checked(_join(dest, path), f"cannot upload {local}", server_limits)
    if dest:
        await client.mkdir(dest, parents=True)
    for path in tree.empty_folders:
        await client.mkdir(_join(dest, path), parents=True)
    total = tree.size
    count = len(tree.files)
    label = f"{dest or '(top)'} ({count} file{'s' if count != 1 else ''})"
    stored = 0
    base = 0  # bytes of the files stored so far
    with progress_bar(label, args.quiet) as progress:
        for path, local, size in tree.files:
            remote = _join(dest, path)
            report = None
            if progress is not None:

                def report(done: int, _size: int, base: int = base) -> None:
                    progress(base + done, total)

            try:
                source = open(local, "rb")  # noqa: SIM115
            except OSError as e:
                raise CommandFailed(
                    f"cannot read {local}: {e.strerror} ({stored} of {count} files stored)"
                ) from None
            try:
                with source:
                    await client.upload(
                        remote,
                        source,
                        resume=args.resume,
                        progress=report,
                        hash=preferred_hash(client),
                    )
            except Exception as e:
                if not (isinstance(e, CancelledError) or args.interrupted):
                    raise _with_count(e, f"{stored} of {count} files stored") from None
                if args.resume:
                    raise Interrupted(
                        f"{stored} of {count} files stored; the server keeps what it "
                        f"received of {remote!r}; 'wsfiles put -r --resume' continues it"
                    ) from None
                raise Interrupted(f"{stored} of {count} files stored") from None
            stored += 1
            base += size
    for skipped in tree.skipped:
        sys.stderr.write(f"wsfiles put: skipped {skipped} (a symlink or special file)\n")


def _with_count(error: Exception, count: str) -> Exception:
    """``error`` as a one-line CommandFailed that also says how far the tree got."""
    from wsfiles.client import WsfilesError

    if isinstance(error, WsfilesError):
        from wsfiles.client_tree import NOT_SUPPORTED

        if error.code == NOT_SUPPORTED:
            return error
        return CommandFailed(f"{error.code}: {error.message} ({count})")
    if isinstance(error, CommandFailed):
        return CommandFailed(f"{error} ({count})")
    return error


# -- get -r ------------------------------------------------------------------------


def prepare_get_tree(args: argparse.Namespace) -> None:
    """``get -r URL PATH [-o DIR]``: check PATH and where DIR goes before connecting."""
    args.remote_folder = folder_argument(args.name)
    if args.remote_folder:
        _checked(args.remote_folder, repr(args.name))
    if args.output == "-":
        raise CommandFailed("-o - writes one file: it does not go with -r")
    local = args.output or args.remote_folder.rsplit("/", 1)[-1]
    if not local:
        raise CommandFailed("get -r of the top folder needs -o DIR")
    if os.path.exists(local) and not os.path.isdir(local):
        raise CommandFailed(f"cannot write {local}: it is not a folder")
    parent = os.path.dirname(os.path.abspath(local))
    if not os.path.isdir(parent):
        raise CommandFailed(f"cannot write {local}: there is no folder {parent}")
    args.local_dir = local


def _local_folder(root: str, path: str) -> str:
    """The local folder for ``path`` under ``root``, created; never outside ``root``."""
    folder = os.path.join(root, *path.split("/")) if path else root
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise CommandFailed(f"cannot create folder {folder}: {e.strerror}") from None
    real = os.path.realpath(folder)
    if real != root and not real.startswith(root + os.sep):
        raise CommandFailed(f"cannot write into {folder}: a symlink there leads out of {root}")
    return folder


async def get_tree(client: Any, args: argparse.Namespace) -> None:
    """List PATH's whole tree, check every name, create the folders, then
    download each file through its own ``.wsfiles-part`` under one progress bar."""
    from wsfiles.cli_format import progress_bar
    from wsfiles.client import WsfilesError
    from wsfiles.client_tree import PathError, check_path, is_folder, require_folders

    require_folders(client)
    remote_folder: str = args.remote_folder
    try:
        entries = await client.list(remote_folder, recursive=True)
    except WsfilesError as e:
        if e.code == "not_a_folder":
            raise CommandFailed(
                f"not_a_folder: {args.name!r} is a file; get it without -r"
            ) from None
        raise
    folders: list[str] = []
    files: list[tuple[str, int]] = []
    for entry in entries:
        name = entry.get("name")
        try:
            check_path(name)  # type: ignore[arg-type]
        except PathError:
            raise CommandFailed(f"bad_reply: the server listed an unusable name {name!r}") from None
        if is_folder(entry):
            folders.append(name)  # type: ignore[arg-type]
            continue
        size = entry.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise CommandFailed(f"bad_reply: the server listed {name!r} with no size")
        files.append((name, size))  # type: ignore[arg-type]
    local_dir: str = args.local_dir
    root = os.path.realpath(_local_folder(os.path.abspath(local_dir), ""))
    for path in folders:
        _local_folder(root, path)
    total = sum(size for _, size in files)
    count = len(files)
    label = f"{remote_folder or '(top)'} ({count} file{'s' if count != 1 else ''})"
    done = 0
    base = 0
    with progress_bar(label, args.quiet) as progress:
        for path, size in files:
            folder, _, name = path.rpartition("/")
            target = os.path.join(_local_folder(root, folder), name)
            report = None
            if progress is not None:

                def report(received: int, _size: int, base: int = base) -> None:
                    progress(base + received, total)

            try:
                await download_file(
                    client,
                    _join(remote_folder, path),
                    target,
                    args,
                    report,
                    resume_hint="'wsfiles get -r --resume' continues it",
                )
            except Interrupted as e:
                raise Interrupted(f"{done} of {count} files downloaded; {e}") from None
            except (WsfilesError, CommandFailed) as e:
                raise _with_count(e, f"{done} of {count} files downloaded") from None
            done += 1
            base += size
