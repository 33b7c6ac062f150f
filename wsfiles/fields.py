"""Reading the fields of a parsed command: one rule per kind of field."""

from __future__ import annotations

import math
from typing import Any

from wsfiles import errors
from wsfiles.errors import ProtocolError
from wsfiles.storage import Precondition


def count_field(message: dict[str, Any], key: str, default: int | None = None) -> int:
    value = message.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ProtocolError(errors.BAD_REQUEST, f"'{key}' must be an integer >= 0")
    return value


def flag_field(message: dict[str, Any], key: str) -> bool:
    value = message.get(key, False)
    if not isinstance(value, bool):
        raise ProtocolError(errors.BAD_REQUEST, f"'{key}' must be true or false")
    return value


def sha256_field(message: dict[str, Any], key: str = "sha256") -> str | None:
    value = message.get(key)
    if value is None:
        return None
    if (
        not isinstance(value, str)
        or len(value) != 64
        or any(ch not in "0123456789abcdefABCDEF" for ch in value)
    ):
        raise ProtocolError(errors.BAD_REQUEST, f"'{key}' must be 64 hexadecimal digits")
    return value.lower()


#: The latest modification time a ``save`` may set: the year 5138, far past
#: any real clock, well inside what file systems and JSON doubles hold.
MAX_MTIME = 1e11


def mtime_field(message: dict[str, Any]) -> float | None:
    """A ``save``'s ``mtime``: seconds since the epoch, 0 to MAX_MTIME."""
    value = message.get("mtime")
    if value is None:
        return None
    if (
        not isinstance(value, int | float)
        or isinstance(value, bool)
        or not math.isfinite(value)
        or not 0 <= value <= MAX_MTIME
    ):
        raise ProtocolError(
            errors.BAD_REQUEST, f"'mtime' must be seconds since 1970, 0 to {MAX_MTIME:.0f}"
        )
    return float(value)


def precondition_field(message: dict[str, Any]) -> Precondition | None:
    """``if_sha256`` (the file stored must have this SHA-256) or ``if_absent``
    (no file may be stored) on a ``save`` or ``delete``."""
    expected = sha256_field(message, "if_sha256")
    absent = flag_field(message, "if_absent")
    if expected is not None and absent:
        raise ProtocolError(errors.BAD_REQUEST, "'if_sha256' and 'if_absent' exclude each other")
    if expected is None and not absent:
        return None
    return Precondition(sha256=expected, absent=absent)
