"""A file server and client built on the ``websockets`` library: the WebSocket peer baseline.

bench/throughput.py compares wsfiles with this, so it does the same job as
wsfiles, in the plainest way the library allows: an upload is one binary
message of many 128 KiB frames, streamed (``recv_streaming``) into a temporary
file that is hashed as it is written, fsynced and renamed into place, and
answered with its SHA-256; a download is one binary message of 128 KiB frames
read from the file and hashed, followed by the SHA-256.  The client checks
both hashes, as wsfiles' client does.  No compression (the library's default
permessage-deflate would measure zlib), no size limit, asyncio's default loop.

Server (a subprocess; prints ``websockets listening on 127.0.0.1:PORT``)::

    python bench/_websockets_peer.py ROOT

Wire format, over ``ws://127.0.0.1:PORT``:
``/up/NAME``: the client sends one binary message; the server answers
``{"size": N, "sha256": HEX}``.  ``/down/NAME``: the server sends one binary
message, then ``{"size": N, "sha256": HEX}``.  Loopback only.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
from pathlib import Path

from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve

FRAME = 128 * 1024
LOOPBACK = "127.0.0.1"
OPTIONS = {"compression": None, "max_size": None, "ping_interval": None}


# -- server -----------------------------------------------------------------


async def receive_file(connection: ServerConnection, root: Path, name: str) -> None:
    temp = root / f".tmp-{name}"
    digest = hashlib.sha256()
    size = 0
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        async for fragment in connection.recv_streaming():
            assert isinstance(fragment, bytes)
            digest.update(fragment)
            view = memoryview(fragment)
            while view:
                view = view[os.write(fd, view) :]
            size += len(fragment)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(temp, root / name)
    await connection.send(json.dumps({"size": size, "sha256": digest.hexdigest()}))


async def send_file(connection: ServerConnection, root: Path, name: str) -> None:
    digest = hashlib.sha256()

    async def frames():  # type: ignore[no-untyped-def]
        with (root / name).open("rb") as f:
            while chunk := f.read(FRAME):
                digest.update(chunk)
                yield chunk

    await connection.send(frames())
    size = (root / name).stat().st_size
    await connection.send(json.dumps({"size": size, "sha256": digest.hexdigest()}))


async def serve_files(root: Path) -> None:
    async def handler(connection: ServerConnection) -> None:
        assert connection.request is not None
        _, what, name = connection.request.path.split("/", 2)
        if what == "up":
            await receive_file(connection, root, name)
        else:
            await send_file(connection, root, name)

    async with serve(handler, LOOPBACK, 0, **OPTIONS) as server:  # type: ignore[arg-type]
        port = server.sockets[0].getsockname()[1]
        print(f"websockets listening on {LOOPBACK}:{port}", flush=True)
        await server.serve_forever()


# -- client (run in a thread by the benchmark) -------------------------------


async def _upload(port: int, source: Path, name: str) -> None:
    digest = hashlib.sha256()

    async def frames():  # type: ignore[no-untyped-def]
        with source.open("rb") as f:
            while chunk := f.read(FRAME):
                digest.update(chunk)
                yield chunk

    async with connect(f"ws://{LOOPBACK}:{port}/up/{name}", **OPTIONS) as ws:  # type: ignore[arg-type]
        await ws.send(frames())
        reply = json.loads(await ws.recv())
    if reply["sha256"] != digest.hexdigest():
        raise RuntimeError("websockets upload: the server stored other bytes")


async def _download(port: int, name: str, sink: Path) -> None:
    digest = hashlib.sha256()
    async with connect(f"ws://{LOOPBACK}:{port}/down/{name}", **OPTIONS) as ws:  # type: ignore[arg-type]
        with sink.open("wb") as f:
            async for fragment in ws.recv_streaming():
                assert isinstance(fragment, bytes)
                digest.update(fragment)
                f.write(fragment)
        reply = json.loads(await ws.recv())
    if reply["sha256"] != digest.hexdigest():
        raise RuntimeError("websockets download: received other bytes than the server sent")


def upload(port: int, source: Path, name: str, timeout: float) -> None:
    """Upload ``source`` as ``name`` (blocking; call it from a thread)."""
    asyncio.run(asyncio.wait_for(_upload(port, source, name), timeout))


def download(port: int, name: str, sink: Path, timeout: float) -> None:
    """Download ``name`` into ``sink`` (blocking; call it from a thread)."""
    asyncio.run(asyncio.wait_for(_download(port, name, sink), timeout))


if __name__ == "__main__":
    asyncio.run(serve_files(Path(sys.argv[1])))
