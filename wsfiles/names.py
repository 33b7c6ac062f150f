"""The rules for file names and client names, in one place."""

from __future__ import annotations

import re

from wsfiles import errors

#: Names with this prefix are reserved for the service's own bookkeeping
#: (the temporary-file folder ``.wsfiles-tmp`` lives in the root).
RESERVED_PREFIX = ".wsfiles-"
MAX_NAME_BYTES = 255

_CLIENT_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
#: Separators and control characters: C0, DEL and C1 (U+0080-U+009F, which
#: holds terminal escapes such as CSI U+009B).
_FORBIDDEN_IN_FILE_NAME = re.compile(r"[/\\\x00-\x1f\x7f-\x9f]")


def check_file_name(name: object) -> str:
    """Return ``name`` if it is a valid file name, else raise ProtocolError.

    A valid name is a single path segment: no separators, no control
    characters, not ``.`` or ``..``, and at most 255 bytes of UTF-8.
    """
    if not isinstance(name, str):
        raise errors.ProtocolError(errors.BAD_REQUEST, "'name' must be a string")
    if not name:
        raise errors.ProtocolError(errors.INVALID_NAME, "the name is empty")
    if name in (".", ".."):
        raise errors.ProtocolError(errors.INVALID_NAME, f"{name!r} is not a file name")
    if _FORBIDDEN_IN_FILE_NAME.search(name):
        raise errors.ProtocolError(
            errors.INVALID_NAME,
            "a name may not contain '/', '\\' or control characters",
        )
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        raise errors.ProtocolError(errors.INVALID_NAME, "the name is not valid Unicode") from None
    if len(encoded) > MAX_NAME_BYTES:
        raise errors.ProtocolError(
            errors.INVALID_NAME, f"the name is longer than {MAX_NAME_BYTES} bytes"
        )
    if name.startswith(RESERVED_PREFIX):
        raise errors.ProtocolError(
            errors.INVALID_NAME, f"names starting with {RESERVED_PREFIX!r} are reserved"
        )
    return name


def is_valid_file_name(name: str) -> bool:
    """``check_file_name`` as a yes/no: a listing shows only names a client can address."""
    try:
        check_file_name(name)
    except errors.ProtocolError:
        return False
    return True


def is_valid_client_name(name: str) -> bool:
    """Client names become folder names: ``[A-Za-z0-9_.-]{1,64}``, no leading dot."""
    return bool(_CLIENT_NAME.fullmatch(name)) and not name.startswith(".")


#: Protocol 1.2 paths: at most this many segments and bytes of UTF-8.
MAX_PATH_DEPTH = 32
MAX_PATH_BYTES = 1024


def check_path(path: object, *, field: str = "name", top: bool = False) -> str:
    """Return ``path`` if it is a valid 1.2 path, else raise ProtocolError.

    Names joined by ``/``, each obeying ``check_file_name``; no leading,
    trailing or doubled ``/``.  With ``top``, the empty string (the client's
    top folder) is allowed too.
    """
    if not isinstance(path, str):
        raise errors.ProtocolError(errors.BAD_REQUEST, f"{field!r} must be a string")
    if path == "" and top:
        return path
    segments = path.split("/")
    if len(segments) > MAX_PATH_DEPTH:
        raise errors.ProtocolError(
            errors.INVALID_NAME, f"the path is deeper than {MAX_PATH_DEPTH} folders"
        )
    for segment in segments:
        if not segment:
            raise errors.ProtocolError(
                errors.INVALID_NAME, "a path may not start or end with '/' or contain '//'"
            )
        check_file_name(segment)
    if len(path.encode("utf-8")) > MAX_PATH_BYTES:
        raise errors.ProtocolError(
            errors.INVALID_NAME, f"the path is longer than {MAX_PATH_BYTES} bytes"
        )
    return path


def parent_of(path: str) -> str:
    """The folder holding ``path`` (``""`` for the top)."""
    return path.rpartition("/")[0]


def is_within(path: str, folder: str) -> bool:
    """Whether ``path`` is ``folder`` itself or lies below it."""
    return path == folder or path.startswith(folder + "/")
