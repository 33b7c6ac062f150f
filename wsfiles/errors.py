"""Error codes of the wire protocol, and the exception that carries one.

Codes are stable: clients switch on them, so never rename one.
"""

from __future__ import annotations

BAD_REQUEST = "bad_request"
UNKNOWN_OP = "unknown_op"
INVALID_NAME = "invalid_name"
NOT_FOUND = "not_found"
TOO_LARGE = "too_large"
SIZE_MISMATCH = "size_mismatch"
WRONG_CHANNEL = "wrong_channel"
UNEXPECTED_DATA = "unexpected_data"
CHANNEL_TIMEOUT = "channel_timeout"
CHANNEL_CLOSED = "channel_closed"
STORAGE_ERROR = "storage_error"
INTERNAL_ERROR = "internal_error"
STALLED = "stalled"
RATE_LIMITED = "rate_limited"
QUOTA_EXCEEDED = "quota_exceeded"
CHECKSUM_MISMATCH = "checksum_mismatch"
EXISTS = "exists"
SUPERSEDED = "superseded"
UNAVAILABLE = "unavailable"
# Protocol 1.2 (folders)
NOT_A_FOLDER = "not_a_folder"
IS_A_FOLDER = "is_a_folder"
NOT_EMPTY = "not_empty"
INVALID_MOVE = "invalid_move"
# A save or delete with "if_sha256" / "if_absent" found another file stored.
CONFLICT = "conflict"

# Per-user permissions (the users file): a read-only user's save, delete,
# rename, mkdir or rmdir.
FORBIDDEN = "forbidden"


class ProtocolError(Exception):
    """A refusal that is reported to the client as ``{"op": "error", ...}``."""

    def __init__(self, code: str, message: str, request_id: str | int | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        #: Set when the error is found before the command's handler runs.
        self.request_id = request_id


def conflict_message(name: str) -> str:
    """The ``conflict`` refusal's text, for a single command or a batch's file."""
    return (
        f"{name!r} is not the file this command expected (changed meanwhile); nothing was changed"
    )
