"""Plain HTTP downloads, ``GET /files/PATH`` and ``HEAD`` (docs/protocol.md,
"Plain HTTP downloads"): what curl, wget and any HTTP client see, over real
sockets on loopback, against in-process servers and a real ``twistd wsfiles``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from conftest import add_user_with_cli, http_request, run_process, spawn_process
from e2e_helpers import MiB, blob, sha256, within
from twisted.internet import reactor, task
from twisted.internet.defer import Deferred
from twisted.logger import globalLogPublisher

from wsfiles.storage.local import LocalStorage
from wsfiles.users import UserDirectory, add_user


async def fetch(
    srv: Any, path: str, method: str = "GET", token: str | None = None, **headers: str
) -> tuple[int, dict[str, str], bytes]:
    """(status, headers by lower-case name, body) of one HTTP/1.1 request."""
    status, received, body = await http_request(srv.url, path, method, token, **headers)
    return status, {name: values[-1] for name, values in received.items()}, body


NAME = 'dossier/été "1".bin'
URL = "/files/dossier/%C3%A9t%C3%A9%20%221%22.bin"


@pytest.mark.every_backend
@pytest_twisted.ensureDeferred
async def test_ranges_validators_and_conditional_requests(server_factory):
    srv = await server_factory()  # no --users: the anonymous folder, no token needed
    data = blob(300_000, seed=1)
    await srv.put(NAME, data)
    size, etag = len(data), f'"{sha256(data)}"'

    status, headers, body = await fetch(srv, URL)
    assert (status, body) == (200, data)
    assert headers["etag"] == etag  # the stored SHA-256: strong
    assert headers["content-length"] == str(size)
    assert headers["accept-ranges"] == "bytes"
    assert headers["cache-control"] == "private, no-cache"
    assert headers["content-type"] == "application/octet-stream"
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["content-disposition"] == (
        "attachment; filename=\"_t_ _1_.bin\"; filename*=UTF-8''%C3%A9t%C3%A9%20%221%22.bin"
    )
    modified = headers["last-modified"]

    status, head_headers, body = await fetch(srv, URL, method="HEAD")
    assert (status, body) == (200, b"")
    assert head_headers["content-length"] == str(size)
    assert head_headers["etag"] == etag

    async def ranged(spec: str, **more: str) -> tuple[int, dict[str, str], bytes]:
        return await fetch(srv, URL, range=spec, **more)

    status, headers, body = await ranged("bytes=100-199")
    assert (status, body, headers["content-range"]) == (206, data[100:200], f"bytes 100-199/{size}")
    assert headers["content-length"] == "100" and headers["etag"] == etag
    status, headers, body = await ranged("bytes=-10")
    assert (status, body, headers["content-range"]) == (
        206,
        data[-10:],
        f"bytes {size - 10}-{size - 1}/{size}",
    )
    status, headers, body = await ranged("bytes=299990-999999")
    assert (status, body) == (206, data[299_990:])
    status, headers, body = await ranged(f"bytes={size}-")  # what `wget -c` sends when done
    assert (status, headers["content-range"]) == (416, f"bytes */{size}")
    status, headers, body = await ranged("bytes=0-0,5-9")  # several ranges: the whole file
    assert (status, body) == (200, data)
    status, _, body = await ranged("bytes=9-3")  # invalid: ignored
    assert (status, body) == (200, data)

    # If-Range: the range only if the client's copy is the current one.
    assert (await ranged("bytes=10-19", if_range=etag))[::2] == (206, data[10:20])
    assert (await ranged("bytes=10-19", if_range=modified))[::2] == (206, data[10:20])
    assert (await ranged("bytes=10-19", if_range='"0000"'))[::2] == (200, data)
    assert (await ranged("bytes=10-19", if_range="W/" + etag))[::2] == (200, data)
    assert (await ranged("bytes=10-19", if_range="Sun, 06 Nov 1994 08:49:37 GMT"))[::2] == (
        200,
        data,
    )

    # If-None-Match / If-Modified-Since: 304, no body, the validators again.
    status, headers, body = await fetch(srv, URL, if_none_match=f'"x", {etag}')
    assert (status, body, headers["etag"]) == (304, b"", etag)
    assert (await fetch(srv, URL, if_none_match='"other"'))[::2] == (200, data)
    assert (await fetch(srv, URL, if_modified_since=modified))[0] == 304
    status, _, body = await fetch(srv, URL, if_modified_since="Sun, 06 Nov 1994 08:49:37 GMT")
    assert (status, body) == (200, data)


@pytest.mark.every_backend
@pytest_twisted.ensureDeferred
async def test_the_stored_sha256_is_the_etag_after_multipart_resumable_saves_and_renames(
    server_factory,
):
    """S3 keeps the hash as object metadata (x-amz-meta-sha256) from commit on,
    and through a rename's copy; the local backend in its xattr."""
    srv = await server_factory()
    folder = srv.storage.folder(None)
    big = blob(9 * MiB, seed=2)  # more than one S3 part, no hash declared
    await srv.put("big.bin", big)
    small = blob(1000, seed=3)
    upload = await folder.begin_upload("resumed.bin", len(small), sha256(small), resume=True)
    upload.write(small)
    await upload.commit()
    await folder.rename("big.bin", "moved/big.bin", False)

    status, headers, body = await fetch(srv, "/files/moved/big.bin", range="bytes=8388600-8388700")
    assert (status, body) == (206, big[8_388_600:8_388_701])  # across the first part's end
    assert headers["etag"] == f'"{sha256(big)}"'
    status, headers, body = await fetch(srv, "/files/resumed.bin")
    assert (status, body, headers["etag"]) == (200, small, f'"{sha256(small)}"')


@pytest_twisted.ensureDeferred
async def test_tokens_only_in_the_authorization_header_and_every_other_path_is_404(
    server_factory, tmp_path
):
    users_file = tmp_path / "users"
    alice, bob = add_user(str(users_file), "alice"), add_user(str(users_file), "bob")
    srv = await server_factory(users=UserDirectory(str(users_file)))
    await _store(srv.storage.folder("bob"), "secret.txt", b"bob's")
    await _store(srv.storage.folder("alice"), "a.txt", b"alice's")
    await _store(srv.storage.folder("alice"), "sub/b.txt", b"b")

    status, headers, _ = await fetch(srv, "/files/a.txt")
    assert status == 401 and headers["www-authenticate"] == 'Bearer realm="wsfiles"'
    assert (await fetch(srv, f"/files/a.txt?token={alice}"))[0] == 401  # never in a URL
    assert (await fetch(srv, "/files/a.txt", authorization=f"Basic {alice}"))[0] == 401
    status, headers, _ = await fetch(srv, "/files/a.txt", token=alice + "x")
    assert status == 401 and 'error="invalid_token"' in headers["www-authenticate"]
    assert (await fetch(srv, "/files/a.txt", token=alice))[::2] == (200, b"alice's")
    assert (await fetch(srv, "/files/a.txt", token=bob))[0] == 404

    root = srv.root / "alice"
    os.symlink("a.txt", root / "link")
    os.symlink(srv.root / "bob", root / "bobs")
    os.mkfifo(root / "fifo")
    (srv.root / "alice" / ".wsfiles-x").write_bytes(b"reserved")
    _, _, missing = await fetch(srv, "/files/nothing-here", token=alice)
    tricks = [
        "/files/secret.txt",  # bob's: alice cannot tell it exists
        "/files/../bob/secret.txt",
        "/files/%2e%2e/bob/secret.txt",
        "/files/sub/..%2Fa.txt",
        "/files/sub",  # a folder
        "/files/sub/",
        "/files/",
        "/files/a.txt/",
        "/files//a.txt",
        "/files/sub//b.txt",
        "/files/link",  # symlinks are never followed
        "/files/bobs/secret.txt",
        "/files/fifo",  # nor special files opened
        "/files/.wsfiles-x",  # reserved names
        "/files/a%00.txt",
        "/files/%ff",  # not UTF-8
        "/files/" + "/".join(["d"] * 40),  # deeper than a path may be
        "/files/" + "n" * 300,  # a name longer than 255 bytes
    ]
    for path in tricks:
        assert (await fetch(srv, path, token=alice))[::2] == (404, missing), path


async def _store(folder: Any, name: str, data: bytes) -> None:
    upload = await folder.begin_upload(name, len(data))
    upload.write(data)
    await upload.commit()


@pytest_twisted.ensureDeferred
async def test_a_client_that_stops_reading_holds_little_and_is_cut(server_factory):
    """Flow control: the file is read only as the connection drains, so a client
    that reads nothing holds about one read plus the socket buffers; the
    transfer-rate rule then cuts it (--stall-timeout)."""
    srv = await server_factory(stall_timeout=1.0)
    size = 48 * MiB
    with open(srv.root / "big.bin", "wb") as f:
        f.truncate(size)
    cut: Deferred = Deferred()

    def observe(event: dict[str, Any]) -> None:
        if str(event.get("what", "")).startswith("the download of") and not cut.called:
            cut.callback(event)

    globalLogPublisher.addObserver(observe)
    reader = socket.socket()
    reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    try:
        reader.connect(("127.0.0.1", srv.port.getHost().port))
        reader.sendall(b"GET /files/big.bin HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        event = await within(cut, 30)
    finally:
        globalLogPublisher.removeObserver(observe)
        reader.close()
    assert event["sent"] < 12 * MiB  # never the whole file: 48 MiB


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (tests/install-tools.sh)")
    return path


@pytest_twisted.ensureDeferred
async def test_curl_and_an_interrupted_wget_c_against_twistd(twistd_factory, tmp_path):
    curl, wget = _tool("curl"), _tool("wget")
    users_file = tmp_path / "users"
    token = add_user_with_cli(users_file, "carol")
    root = tmp_path / "root"
    srv = await twistd_factory("--users", str(users_file), root=root)
    data = blob(8 * MiB, seed=4)
    storage = LocalStorage(str(root))
    await _store(storage.folder("carol"), "dir/über.bin", data)
    url = f"http://{srv.url.split('://', 1)[1]}/files/dir/%C3%BCber.bin"
    auth = f"Authorization: Bearer {token}"

    out = tmp_path / "curl"
    out.mkdir()
    code, _, err = await run_process([curl, "-sSf", "-H", auth, "-O", url], cwd=out)
    assert code == 0, err
    assert (out / "%C3%BCber.bin").read_bytes() == data
    code, _, _ = await run_process([curl, "-sSf", "-o", "/dev/null", url])
    assert code == 22  # 401 without the header

    got = tmp_path / "wget"
    got.mkdir()
    target = got / "über.bin"
    argv = [wget, "-q", "--header", auth, "-O", str(target), url]
    process, proto = spawn_process([*argv[:2], "--limit-rate=1m", *argv[2:]], cwd=got)
    await _grows(target, 256 * 1024)
    process.signalProcess("KILL")  # interrupted: a partial file is left
    await within(proto.ended)
    partial = target.stat().st_size
    assert 0 < partial < len(data)
    code, _, err = await run_process([wget, "-c", "-q", "--header", auth, "-O", str(target), url])
    assert code == 0, err
    assert hashlib.sha256(target.read_bytes()).hexdigest() == sha256(data)

    await srv.stop()
    assert '"GET /files/dir/%C3%BCber.bin HTTP/1.1" 206' in srv.output  # resumed
    assert token not in srv.output and token.split(".", 1)[-1] not in srv.output


async def _grows(path: Path, size: int, seconds: float = 20.0) -> None:
    """Wait (a bounded poll of the file system) until ``path`` holds ``size`` bytes."""
    for _ in range(int(seconds / 0.02)):
        if path.exists() and path.stat().st_size >= size:
            return
        await task.deferLater(reactor, 0.02, lambda: None)
    raise AssertionError(f"{path} never reached {size} bytes")
