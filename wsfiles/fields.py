"""Reading the fields of a parsed command: one rule per kind of field."""

from __future__ import annotations

from typing import Any

from wsfiles import errors
from wsfiles.errors import ProtocolError


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


def sha256_field(message: dict[str, Any]) -> str | None:
    value = message.get("sha256")
    if value is None:
        return None
    if (
        not isinstance(value, str)
        or len(value) != 64
        or any(ch not in "0123456789abcdefABCDEF" for ch in value)
    ):
        raise ProtocolError(errors.BAD_REQUEST, "'sha256' must be 64 hexadecimal digits")
    return value.lower()
