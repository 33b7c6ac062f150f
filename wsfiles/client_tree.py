"""Folders (protocol 1.2) for the Python client: paths, paged listings, mkdir, rmdir.

Written from docs/protocol.md ("Folders"), apart from the server's code: the
path rule below is the client's own copy of the documented rule, because a
client that writes files named by a server's listing (``wsfiles get -r``)
must not trust those names to stay inside its folder.

A server speaks 1.2 on a command channel only when the client offered the
subprotocol ``wsfiles.v1.2`` and the server selected it; ``folders`` in
``hello.features`` says the server has folders.  Against a 1.1 server these
helpers raise :data:`NOT_SUPPORTED` for anything below the top folder.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from wsfiles.client import WsfilesClient

#: The subprotocol that opts a command channel into protocol 1.2.
SUBPROTOCOL_12 = "wsfiles.v1.2"
#: The feature a 1.2 server lists in ``hello.features``.
FOLDERS = "folders"
#: Client-side error code: the server (or this channel) has no folders.
NOT_SUPPORTED = "not_supported"
NOT_SUPPORTED_MESSAGE = "this server does not support folders (protocol 1.2)"
#: Client-side error code: a reply that breaks the protocol (e.g. pages that never end).
BAD_REPLY = "bad_reply"

#: Documented defaults, used when ``hello`` does not announce its own.
MAX_PATH = 1024
MAX_DEPTH = 32
MAX_NAME_BYTES = 255
RESERVED_PREFIX = ".wsfiles-"
_FORBIDDEN = re.compile(r"[/\\\x00-\x1f\x7f-\x9f]")


class PathError(ValueError):
    """A path that breaks the documented rules; ``str()`` says which one."""


def check_segment(name: str) -> None:
    """Raise PathError unless ``name`` is one valid path segment (docs: Names)."""
    if not name:
        raise PathError("empty names (a leading, trailing or doubled '/') are not allowed")
    if name in (".", ".."):
        raise PathError(f"{name!r} is not a name")
    if _FORBIDDEN.search(name):
        raise PathError(f"{name!r}: a name may not contain '\\' or control characters")
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        raise PathError(f"{name!r} is not valid Unicode") from None
    if size > MAX_NAME_BYTES:
        raise PathError(f"a name is at most {MAX_NAME_BYTES} bytes of UTF-8")
    if name.startswith(RESERVED_PREFIX):
        raise PathError(f"names starting with {RESERVED_PREFIX!r} are reserved")


def check_path(path: str, *, max_path: int = MAX_PATH, max_depth: int = MAX_DEPTH) -> str:
    """Return ``path`` if it is a valid 1.2 path (docs: Paths), else raise PathError."""
    if not isinstance(path, str):
        raise PathError(f"{path!r} is not a string")
    segments = path.split("/")
    for segment in segments:
        check_segment(segment)
    if len(segments) > max_depth:
        raise PathError(f"{path!r} is deeper than {max_depth} folders")
    if len(path.encode("utf-8")) > max_path:
        raise PathError(f"{path!r} is longer than {max_path} bytes")
    return path


def join(folder: str, name: str) -> str:
    """``folder/name``, or ``name`` alone in the top folder (``""``)."""
    return f"{folder}/{name}" if folder else name


def speaks_folders(client: WsfilesClient) -> bool:
    """Whether this command channel speaks 1.2 with folders.

    Both must hold: the server selected ``wsfiles.v1.2`` for this channel
    (a 1.1 channel never sees a folder) and lists ``folders`` in its features.
    """
    features = client.hello.get("features") or []
    return client.subprotocol == SUBPROTOCOL_12 and FOLDERS in features


def no_folders(client: WsfilesClient) -> Exception:
    """WsfilesError ``not_supported``: the server has no folders, or (a library
    caller's slip) this channel never offered ``wsfiles.v1.2``."""
    from wsfiles.client import WsfilesError

    if SUBPROTOCOL_12 not in getattr(client, "subprotocols", (SUBPROTOCOL_12,)):
        return WsfilesError(
            NOT_SUPPORTED,
            "this channel speaks protocol 1.1: connect with "
            "subprotocols=COMMAND_SUBPROTOCOLS for folders (protocol 1.2)",
        )
    return WsfilesError(NOT_SUPPORTED, NOT_SUPPORTED_MESSAGE)


def require_folders(client: WsfilesClient) -> None:
    """Raise WsfilesError ``not_supported`` on a channel without folders."""
    if not speaks_folders(client):
        raise no_folders(client)


def limits(client: WsfilesClient) -> dict[str, int]:
    """The server's path limits from ``hello`` (documented defaults if absent)."""
    hello = client.hello

    def number(key: str, default: int) -> int:
        value = hello.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) else default

    return {
        "max_path": number("max_path", MAX_PATH),
        "max_depth": number("max_depth", MAX_DEPTH),
    }


async def list_folder(
    client: WsfilesClient,
    path: str = "",
    *,
    recursive: bool = False,
    limit: int | None = None,
    sha256: bool = False,
) -> list[dict[str, Any]]:
    """Every entry of folder ``path`` (the whole subtree with ``recursive``);
    with ``sha256``, every file entry carries its SHA-256 (for sync).

    Follows ``cursor`` to the last page.  Bounded by the replies: every page
    with a cursor must bring entries and a cursor not seen before, otherwise
    the listing stops with ``bad_reply`` instead of asking forever.
    """
    from wsfiles.client import WsfilesError

    if not speaks_folders(client):
        if path or recursive:
            raise no_folders(client)
        return (await client.request({"op": "list"}))["files"]
    message: dict[str, Any] = {"op": "list"}
    if path:
        message["path"] = path
    if recursive:
        message["recursive"] = True
    if limit is not None:
        message["limit"] = limit
    if sha256:
        message["sha256"] = True
    entries: list[dict[str, Any]] = []
    seen: set[str] = set()
    cursor: Any = None
    while True:
        reply = await client.request(message if cursor is None else {**message, "cursor": cursor})
        files = reply.get("files")
        if not isinstance(files, list):
            raise WsfilesError(BAD_REPLY, "a list reply without 'files'", reply)
        entries.extend(files)
        cursor = reply.get("cursor")
        if cursor is None:
            return entries
        if not files or not isinstance(cursor, str) or cursor in seen:
            raise WsfilesError(BAD_REPLY, "the server's list pages do not advance", reply)
        seen.add(cursor)


async def mkdir(client: WsfilesClient, path: str, *, parents: bool = False) -> dict[str, Any]:
    """Create folder ``path``; ``parents`` creates missing parents and accepts
    an existing folder (``mkdir -p``)."""
    require_folders(client)
    message: dict[str, Any] = {"op": "mkdir", "path": path}
    if parents:
        message["parents"] = True
    return await client.request(message)


async def rmdir(client: WsfilesClient, path: str, *, recursive: bool = False) -> dict[str, Any]:
    """Remove folder ``path``: only when empty, unless ``recursive``."""
    require_folders(client)
    message: dict[str, Any] = {"op": "rmdir", "path": path}
    if recursive:
        message["recursive"] = True
    return await client.request(message)


def is_folder(entry: dict[str, Any]) -> bool:
    """A listing entry names a folder (1.1 entries, without ``type``, are files)."""
    return entry.get("type") == "folder"


class FolderCommands:
    """The folder commands of :class:`wsfiles.client.WsfilesClient` (a mixin,
    so client.py keeps to channels and transfers)."""

    hello: dict[str, Any]
    subprotocol: str | None

    @property
    def folders(self) -> bool:
        """Whether this channel speaks protocol 1.2 with folders."""
        return speaks_folders(self)  # type: ignore[arg-type]

    def _paths_allowed(self, *names: str) -> None:
        """A valid path below the top needs folders: say so rather than
        ``invalid_name``.  Anything else (``../etc``) goes to the server, whose
        answer is the one that counts."""
        if not self.folders and any("/" in name and _is_path(name) for name in names):
            raise no_folders(self)  # type: ignore[arg-type]

    async def list(self, path: str = "", recursive: bool = False) -> list[dict[str, Any]]:
        """The entries of folder ``path`` (the top by default; the whole subtree
        with ``recursive``), every page of them.  Below the top, or recursive,
        needs folders (protocol 1.2): else WsfilesError ``not_supported``."""
        return await list_folder(self, path, recursive=recursive)  # type: ignore[arg-type]

    async def mkdir(self, path: str, parents: bool = False) -> dict[str, Any]:
        """Create folder ``path`` (1.2); ``parents`` as ``mkdir -p``."""
        return await mkdir(self, path, parents=parents)  # type: ignore[arg-type]

    async def rmdir(self, path: str, recursive: bool = False) -> dict[str, Any]:
        """Remove folder ``path`` (1.2): ``not_empty`` unless ``recursive``."""
        return await rmdir(self, path, recursive=recursive)  # type: ignore[arg-type]


def _is_path(name: str) -> bool:
    from wsfiles.errors import ProtocolError
    from wsfiles.names import check_path

    try:
        check_path(name)
    except ProtocolError:
        return False
    return True
