"""Protocol 1.2 folders: the commands that only 1.2 channels have, and the
mapping of storage refusals to error codes (docs/protocol.md, "Folders").

Plain functions of an IFolder and a parsed command: the session calls them,
so they are tested without a network like the rest of the command handling.
"""

from __future__ import annotations

from typing import Any

from wsfiles import errors
from wsfiles.errors import ProtocolError
from wsfiles.fields import flag_field
from wsfiles.names import MAX_PATH_BYTES, MAX_PATH_DEPTH, check_path, is_within
from wsfiles.storage import (
    Entry,
    Exists,
    FileInfo,
    FolderInfo,
    IFolder,
    IsAFolder,
    NotAFolder,
    NotEmpty,
    NotFound,
    PreconditionFailed,
)

#: The subprotocol a 1.2 client offers (docs/protocol.md).
SUBPROTOCOL_12 = "wsfiles.v1.2"
#: Entries in one ``list`` reply at most (announced as ``max_list``).
MAX_LIST = 1000


def hello_fields() -> dict[str, Any]:
    """What ``hello`` adds on a 1.2 channel."""
    return {
        "protocol": "1.2",
        "max_path": MAX_PATH_BYTES,
        "max_depth": MAX_PATH_DEPTH,
        "max_list": MAX_LIST,
    }


def refusal(error: Exception, path: str) -> ProtocolError | None:
    """The error a client gets for a storage refusal about ``path`` (None:
    not a refusal of this kind)."""
    if isinstance(error, NotFound):
        return ProtocolError(errors.NOT_FOUND, f"nothing at {path!r}")
    if isinstance(error, NotAFolder):
        return ProtocolError(errors.NOT_A_FOLDER, f"a file is in the way of {path!r}")
    if isinstance(error, IsAFolder):
        return ProtocolError(errors.IS_A_FOLDER, f"{path!r} is a folder")
    if isinstance(error, NotEmpty):
        return ProtocolError(
            errors.NOT_EMPTY, f'{path!r} is not empty; send "recursive": true to remove it all'
        )
    if isinstance(error, Exists):
        return ProtocolError(errors.EXISTS, f"{path!r} exists")
    if isinstance(error, PreconditionFailed):
        return ProtocolError(errors.CONFLICT, errors.conflict_message(path))
    return None


async def listing(folder: IFolder, message: dict[str, Any]) -> dict[str, Any]:
    """A ``list`` reply (without its id): one page of a folder or of a tree."""
    path = check_path(message.get("path", ""), field="path", top=True)
    recursive = flag_field(message, "recursive")
    limit = message.get("limit", MAX_LIST)
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise ProtocolError(errors.BAD_REQUEST, "'limit' must be an integer >= 1")
    limit = min(limit, MAX_LIST)
    cursor = message.get("cursor")
    if cursor is not None and not isinstance(cursor, str):
        raise ProtocolError(errors.BAD_REQUEST, "'cursor' must be a string from a list reply")
    if cursor is not None and cursor != "":
        check_path(cursor, field="cursor")  # a cursor is the last path sent
    with_sha256 = flag_field(message, "sha256")
    entries = await folder.entries(path, recursive, cursor or None, limit)
    page = entries[:limit]
    if with_sha256:  # for sync clients: one more pass over the page's files
        prefix = f"{path}/" if path else ""
        files = [prefix + entry.name for entry in page if isinstance(entry, FileInfo)]
        described = await folder.described(files)
        page = [_described(entry, described.get(prefix + entry.name)) for entry in page]
        page = [entry for entry in page if entry is not None]  # files gone meanwhile
    reply: dict[str, Any] = {"op": "list", "path": path}
    reply["files"] = [entry.as_entry() for entry in page]
    if len(entries) > limit:
        reply["cursor"] = entries[limit - 1].name
    return reply


def _described(entry: Entry, described: FileInfo | None) -> Entry | None:
    """A listed file as described with its SHA-256 (the size and mtime it was
    hashed at), under its listed name; None if it went away meanwhile."""
    if isinstance(entry, FolderInfo):
        return entry
    if described is None:
        return None
    return FileInfo(entry.name, described.size, described.mtime, described.sha256)


async def make_folder(folder: IFolder, message: dict[str, Any]) -> str:
    path = check_path(message.get("path"), field="path")
    await folder.mkdir(path, flag_field(message, "parents"))
    return path


async def remove_folder(folder: IFolder, message: dict[str, Any]) -> str:
    path = check_path(message.get("path"), field="path")
    await folder.rmdir(path, flag_field(message, "recursive"))
    return path


def check_move(name: str, to: str) -> None:
    """A folder cannot move into itself or below itself."""
    if to != name and is_within(to, name):
        raise ProtocolError(errors.INVALID_MOVE, f"cannot move {name!r} into itself ({to!r})")


#: Entries read at a time while measuring a folder about to move.
_EXTENT_PAGE = 10_000


async def check_move_fits(folder: IFolder, name: str, to: str) -> None:
    """Moving folder ``name`` to ``to`` must keep every path in it within the
    path limits; else a tree could be pushed deeper than anything the server
    lists, counts against quotas, or can remove (docs/protocol.md, Paths)."""
    deepest, longest, cursor = 0, 0, None
    for _ in range(10**6):  # bounded: each round reads the next page, or ends
        page = await folder.entries(name, True, cursor, _EXTENT_PAGE)
        for entry in page[:_EXTENT_PAGE]:
            deepest = max(deepest, entry.name.count("/") + 1)
            longest = max(longest, len(entry.name.encode("utf-8")) + 1)
        if len(page) <= _EXTENT_PAGE:
            break
        cursor = page[_EXTENT_PAGE - 1].name
    depth = to.count("/") + 1 + deepest
    length = len(to.encode("utf-8")) + longest
    if depth > MAX_PATH_DEPTH or length > MAX_PATH_BYTES:
        raise ProtocolError(
            errors.INVALID_MOVE,
            f"moving {name!r} to {to!r} would make paths deeper than {MAX_PATH_DEPTH} folders"
            f" or longer than {MAX_PATH_BYTES} bytes",
        )
