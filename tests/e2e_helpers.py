"""Helpers shared by the end-to-end suites (test_e2e_*.py)."""

from __future__ import annotations

import hashlib
import random
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.defer import Deferred

from wsfiles.client import WsfilesClient
from wsfiles.storage import TEMP_FOLDER

TIMEOUT = 10.0
KiB = 1024
MiB = 1024 * 1024
#: Events a newer server pushes on its own (protocol 1.1: folder changes); the
#: protocol-1 suites look past them.
UNSOLICITED = {"changed"}


def within(awaitable: Any, seconds: float = TIMEOUT) -> Deferred:
    """``awaitable`` as a Deferred that fails with TimeoutError after ``seconds``."""
    return defer.ensureDeferred(awaitable).addTimeout(seconds, reactor)


def blob(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def next_reply(client: WsfilesClient, request_id: Any) -> dict[str, Any]:
    return await within(client.reply(request_id))


def record(client: WsfilesClient) -> list[dict[str, Any]]:
    """Every message the command channel receives from now on, in arrival order
    (except unsolicited events)."""
    log: list[dict[str, Any]] = []
    received = client._received

    def recording(message: dict[str, Any]) -> None:
        if message.get("op") not in UNSOLICITED:
            log.append(message)
        received(message)

    client._received = recording  # type: ignore[method-assign]
    return log


async def open_channel(client: WsfilesClient, url: str) -> None:
    """Open the file channel the server offered (what upload/download do inside)."""
    await within(client._open_file_channel(url))


def stray_notices(client: WsfilesClient) -> list[dict[str, Any]]:
    """Queued messages that answer no command (unsolicited events aside)."""
    return [m for m in client.notices.pending if m.get("op") not in UNSOLICITED]


def command_channels(server: Any) -> list[Any]:
    """The server's open command channels (its protocol objects)."""
    return [c for c in server.site.book.open if c.channel_name == "command"]


def stored(server: Any) -> dict[str, bytes]:
    """The regular files of the (anonymous) folder, with their contents."""
    return {p.name: p.read_bytes() for p in server.folder().iterdir() if p.is_file()}


def temp_files(server: Any) -> list[str]:
    """Files (at any depth) in ROOT/.wsfiles-tmp: there must be none after a transfer."""
    temp = server.folder() / TEMP_FOLDER
    return sorted(str(p.relative_to(temp)) for p in temp.rglob("*") if not p.is_dir())


def local_only(server: Any, why: str) -> None:
    """Skip on backends other than local folders, saying why."""
    import pytest

    if getattr(server, "backend", "local") != "local":
        pytest.skip(f"local folders only: {why}")
