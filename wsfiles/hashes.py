"""The whole-file hashes a transfer may use (docs/protocol.md, "Faster hashing").

SHA-256 is the default and what every client (browsers too) can compute;
BLAKE3 (the ``blake3`` package) costs about a third of SHA-256's CPU here, so
clients that have it may ask for it with ``"hash": "blake3"`` on ``save`` and
``get``.  Everything that knows about more than one hash asks this module:
the names, how to make a hash object, how to read the fields that carry a
digest, and the extended attribute a local folder records a digest in.
"""

from __future__ import annotations

import hashlib
from typing import Any

from wsfiles import errors
from wsfiles.errors import ProtocolError
from wsfiles.fields import sha256_field

SHA256 = "sha256"
BLAKE3 = "blake3"

try:  # an install requirement, but a server without it still serves SHA-256
    import blake3 as _blake3
except ImportError:  # pragma: no cover - blake3 ships wheels for every platform we test
    _blake3 = None

#: Every hash this server knows, in the order ``hello`` lists them.
KNOWN: tuple[str, ...] = (SHA256, BLAKE3) if _blake3 is not None else (SHA256,)
#: Hex digits of each hash's digest (both are 32 bytes).
_HEX_LENGTH = {SHA256: 64, BLAKE3: 64}


def new(name: str = SHA256) -> Any:
    """A fresh hash object (``update``/``hexdigest``) for hash ``name``.

    BLAKE3 runs on one thread: a transfer's hashing already has a thread of
    its own, and the other core belongs to the network and the peer."""
    if name == BLAKE3 and _blake3 is not None:
        return _blake3.blake3()
    if name == SHA256:
        return hashlib.sha256()
    raise ValueError(f"unknown hash {name!r}")


_LOWER_HEX = frozenset("0123456789abcdef")


def is_digest(name: str, value: object) -> bool:
    """Whether ``value`` is a lowercase hex digest of hash ``name`` (checked for
    every recorded digest read: every download, every listed file)."""
    return (
        isinstance(value, str)
        and len(value) == _HEX_LENGTH.get(name, -1)
        and _LOWER_HEX.issuperset(value)
    )


def hash_field(message: dict[str, Any], accepted: tuple[str, ...]) -> str:
    """A ``save``'s or ``get``'s ``hash``: one of ``accepted`` (SHA-256 when absent)."""
    value = message.get("hash", SHA256)
    if not isinstance(value, str) or value not in accepted:
        raise ProtocolError(
            errors.BAD_REQUEST, f"'hash' must be one of {', '.join(accepted)} on this server"
        )
    return value


def digest_field(message: dict[str, Any], name: str) -> str | None:
    """The digest a ``save`` declares for hash ``name`` (the field named like
    it), lowercased; None when absent.  A ``save`` with ``"hash": "blake3"``
    that also declares ``sha256`` is refused: the server would not compute it."""
    for other in _HEX_LENGTH:
        if other != name and message.get(other) is not None:
            raise ProtocolError(
                errors.BAD_REQUEST,
                f"'{other}' cannot be checked on a save hashed with {name}; declare '{name}'",
            )
    assert _HEX_LENGTH[name] == 64  # (as fields.sha256_field checks, for either hash)
    return sha256_field(message, name)


def label(name: str) -> str:
    """How messages name the hash ("SHA-256", "BLAKE3")."""
    return {SHA256: "SHA-256", BLAKE3: "BLAKE3"}.get(name, name)


def xattr(name: str) -> str:
    """The extended attribute a local folder keeps hash ``name``'s digest in,
    as "HEX SIZE MTIME_NS INODE" (wsfiles/storage/local.py)."""
    return f"user.wsfiles.{name}"


def preferred(client: Any) -> str:
    """The hash a client (``wsfiles.client``) should ask for: BLAKE3 where the
    server's ``hello`` offers it and this process can compute it, else SHA-256
    (what every server takes)."""
    offered = getattr(client, "hello", {}).get("hashes")
    if _blake3 is not None and isinstance(offered, list) and BLAKE3 in offered:
        return BLAKE3
    return SHA256
