"""Hardening, part B: TLS, crashes, failing disks, races, names, and fuzzing.

Every network test uses real loopback sockets (an in-process server, or a
real ``twistd -n wsfiles`` process).  No test sleeps to synchronise: every
wait is on an event and bounded with ``Deferred.addTimeout``.  The one
exception is the crash test, which watches another process's files with a
bounded polling loop (a process we are about to SIGKILL cannot tell us).
"""

from __future__ import annotations

import datetime
import hashlib
import io
import ipaddress
import json
import os
import random
import re
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

import pytest
import pytest_twisted
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from conftest import InProcessServer, _TrackingFactory
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from twisted.internet import defer, endpoints, interfaces, reactor, task
from twisted.internet.defer import Deferred, DeferredQueue
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.task import Clock
from zope.interface import implementer

from wsfiles.client import WsfilesClient, WsfilesError, connect
from wsfiles.config import Settings
from wsfiles.names import RESERVED_PREFIX, check_file_name
from wsfiles.pairing import PairingRegistry
from wsfiles.session import CommandSession
from wsfiles.storage import (
    TEMP_FOLDER,
    IFolder,
    IStorage,
    IUpload,
    StorageFailure,
)
from wsfiles.storage.local import LocalStorage
from wsfiles.users import UserDirectory, add_user
from wsfiles.web import WsfilesSite

# Hypothesis keeps caches (and failing-example patches) in ./.hypothesis: not in the repo.
set_hypothesis_home_dir(os.path.join(tempfile.gettempdir(), "wsfiles-tests-hypothesis"))

TIMEOUT = 15.0
MiB = 1024 * 1024

#: The ops a server may send (docs/protocol.md, "Messages on the command channel").
SERVER_OPS = {"hello", "list", "channel", "ready", "sending", "sent", "ack", "error"}
#: The error codes of docs/protocol.md's table.
DOCUMENTED_CODES = {
    "bad_request",
    "unknown_op",
    "invalid_name",
    "not_found",
    "too_large",
    "size_mismatch",
    "wrong_channel",
    "unexpected_data",
    "channel_timeout",
    "channel_closed",
    "storage_error",
    "internal_error",
}


# -- helpers ------------------------------------------------------------------


def within(awaitable: Any, seconds: float = TIMEOUT) -> Deferred:
    """``awaitable`` as a Deferred that fails with TimeoutError after ``seconds``."""
    return defer.ensureDeferred(awaitable).addTimeout(seconds, reactor)


def blob(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


async def download(client: WsfilesClient, name: str) -> bytes:
    sink = io.BytesIO()
    await within(client.download(name, sink))
    return sink.getvalue()


async def error_code(awaitable: Any) -> str:
    """The code of the WsfilesError ``awaitable`` fails with (it must fail)."""
    try:
        result = await within(awaitable)
    except WsfilesError as e:
        return e.code
    raise AssertionError(f"expected an error, got {result!r}")


def temp_entries(root: Path) -> list[str]:
    """Every file under ROOT/.wsfiles-tmp (sub-folders themselves do not count)."""
    folder = root / TEMP_FOLDER
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if not path.is_dir())


async def start_site(
    root: Path, storage: IStorage, users: UserDirectory | None = None, **settings: Any
) -> InProcessServer:
    """Like conftest.start_server, with any IStorage (stop it with ``await srv.stop()``)."""
    site = WsfilesSite(Settings(**settings), storage, users, reactor)
    tracker = _TrackingFactory(site)
    port = await endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(tracker)
    return InProcessServer(site, root, f"ws://127.0.0.1:{port.getHost().port}", port, tracker)


def make_users(path: Path, *names: str) -> tuple[UserDirectory, dict[str, str]]:
    tokens = {name: add_user(str(path), name) for name in names}
    return UserDirectory(str(path)), tokens


# -- 1. TLS -------------------------------------------------------------------


def self_signed_localhost(folder: Path) -> tuple[Path, Path, bytes]:
    """A throw-away key and self-signed certificate for "localhost"."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_path, cert_path = folder / "key.pem", folder / "cert.pem"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    cert_path.write_bytes(cert_pem)
    return key_path, cert_path, cert_pem


_ANNOUNCE = re.compile(r"wsfiles listening on (\S+):(\d+) \((ssl:[^)]*)\)")


async def tls_port(srv: Any) -> int:
    """The port of the ``ssl:`` listener, from twistd's announce lines.

    Both listeners are announced in the same reactor turn, but their lines may
    reach us in separate reads: wait for the ssl one (event-driven, bounded).
    """
    found: Deferred = Deferred()
    proto = srv.proto
    original = proto.outReceived

    def check() -> None:
        match = _ANNOUNCE.search(proto.output.decode(errors="replace"))
        if match and not found.called:
            found.callback(int(match.group(2)))

    def watching(data: bytes) -> None:
        original(data)
        check()

    proto.outReceived = proto.errReceived = watching
    try:
        check()
        return await within(found, 10)
    finally:
        proto.outReceived = proto.errReceived = original


@pytest.fixture
def tls_server_args(tmp_path):
    key, cert, cert_pem = self_signed_localhost(tmp_path)
    listen = f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}"
    return listen, cert_pem


@pytest_twisted.ensureDeferred
async def test_tls_round_trip_with_verified_certificate(twistd_factory, tls_server_args):
    listen, cert_pem = tls_server_args
    srv = await twistd_factory("--listen", listen)
    port = await tls_port(srv)
    assert f":{port} (ssl:" in srv.output and " (tcp:0:" in srv.output
    options = optionsForClientTLS("localhost", trustRoot=Certificate.loadPEM(cert_pem))
    client = await within(connect(f"wss://localhost:{port}", tls_options=options))
    try:
        assert client.hello["client"] == "anonymous"
        data = blob(2 * MiB, seed=1)
        ack = await within(client.upload("over-tls.bin", data))
        assert ack["sha256"] == hashlib.sha256(data).hexdigest()
        assert await download(client, "over-tls.bin") == data
        assert (srv.root / "over-tls.bin").read_bytes() == data
        # The file channel went over TLS too (same scheme, host and port).
        assert client._file is not None
        assert interfaces.ISSLTransport.providedBy(client._file.transport)
    finally:
        await within(client.close())


@pytest_twisted.ensureDeferred
async def test_tls_self_signed_certificate_refused_by_default_trust(
    twistd_factory, tls_server_args
):
    listen, cert_pem = tls_server_args
    srv = await twistd_factory("--listen", listen)
    port = await tls_port(srv)
    with pytest.raises(WsfilesError) as caught:
        client = await within(connect(f"wss://localhost:{port}"))
        await within(client.close())  # (only reached if the test fails)
    assert caught.value.code == "connection_failed"
    assert "certificate verify failed" in caught.value.message
    # The server is fine afterwards: a verifying client still gets in.
    options = optionsForClientTLS("localhost", trustRoot=Certificate.loadPEM(cert_pem))
    client = await within(connect(f"wss://localhost:{port}", tls_options=options))
    await within(client.close())


# -- 2. Crash safety ----------------------------------------------------------


class PatternSource:
    """A large, seekable, read-only "file" that costs no disk: one block, repeated."""

    def __init__(self, size: int, seed: int = 7) -> None:
        self._block = blob(256 * 1024, seed)
        self._size = size
        self._position = 0

    def read(self, n: int = -1) -> bytes:
        left = self._size - self._position
        n = left if n < 0 else min(n, left)
        offset = self._position % len(self._block)
        chunk = (self._block[offset:] + self._block)[: min(n, len(self._block))]
        self._position += len(chunk)
        return chunk

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._size}[whence]
        self._position = base + offset
        return self._position

    def tell(self) -> int:
        return self._position


async def temp_file_with_bytes(root: Path, at_least: int, tries: int = 400) -> str:
    """Poll ROOT/.wsfiles-tmp until an upload's temp file holds ``at_least`` bytes.

    A bounded polling loop on another process's state (the twistd we are about
    to SIGKILL has no way to tell us): every 25 ms, at most ``tries`` times.
    """
    folder = root / TEMP_FOLDER
    for _ in range(tries):
        for entry in os.scandir(folder):
            if entry.stat(follow_symlinks=False).st_size >= at_least:
                return entry.name
        await task.deferLater(reactor, 0.025, lambda: None)
    raise AssertionError(f"no temp file of {at_least} bytes in {folder}")


async def failure_of(d: Deferred, seconds: float = TIMEOUT) -> Exception:
    """The exception ``d`` fails with (it must fail, in time)."""
    try:
        result = await within(d, seconds)
    except Exception as e:
        return e
    raise AssertionError(f"expected a failure, got {result!r}")


@pytest_twisted.ensureDeferred
async def test_sigkill_during_upload_leaves_old_file_and_no_partial(twistd_factory, tmp_path):
    root = tmp_path / "crash-root"
    important = blob(100_000, seed=2)
    srv = await twistd_factory(root=root)
    client = await within(connect(srv.url))
    try:
        await within(client.upload("important.bin", important))
        # 1 GiB (the default max size) streamed from memory: the server could not
        # finish it in the time the poll below needs to notice the temp file.
        uploading = defer.ensureDeferred(client.upload("important.bin", PatternSource(1024**3)))
        partial = await temp_file_with_bytes(root, at_least=MiB)
        await srv.kill()
        error = await failure_of(uploading)
        assert isinstance(error, WsfilesError) and error.code == "channel_closed", error
    finally:
        await within(client.close())
    # The crash left the partial upload in the temp folder, the old file in place.
    assert partial in temp_entries(root)
    assert (root / "important.bin").read_bytes() == important

    again = await twistd_factory(root=root)
    assert "removed 1 temporary files left by interrupted uploads" in again.output
    assert temp_entries(root) == []
    client = await within(connect(again.url))
    try:
        assert [(f["name"], f["size"]) for f in client.hello["files"]] == [
            ("important.bin", len(important))
        ]
        assert await download(client, "important.bin") == important
        v2 = blob(3 * MiB, seed=3)
        await within(client.upload("important.bin", v2))
        assert await download(client, "important.bin") == v2
        assert [(f["name"], f["size"]) for f in await within(client.list())] == [
            ("important.bin", len(v2))
        ]
    finally:
        await within(client.close())
    assert temp_entries(root) == []


class _MuteServerProtocol(WebSocketServerProtocol):
    """Says hello like a wsfiles server, then never answers: commands stay pending."""

    def onOpen(self) -> None:
        hello = {"op": "hello", "protocol": 1, "client": "anonymous", "max_size": 1, "files": []}
        self.sendMessage(json.dumps(hello).encode(), isBinary=False)
        self.factory.connections.append(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.factory.received.put(payload)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.factory.gone.callback(None)


@pytest_twisted.ensureDeferred
async def test_client_survives_losing_its_connection_mid_command():
    """Pending commands fail with channel_closed and close() returns.

    (Found by the crash test: _command_closed used to iterate the reply queues
    while failing them, raise RuntimeError, and leave close() hanging.)
    """
    factory = WebSocketServerFactory()
    factory.protocol = _MuteServerProtocol
    factory.connections, factory.received, factory.gone = [], DeferredQueue(), Deferred()
    port = await endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
    try:
        client = await within(connect(f"ws://127.0.0.1:{port.getHost().port}"))
        pending = [defer.ensureDeferred(client.list()) for _ in range(2)]
        for _ in pending:
            await within(factory.received.get())
        factory.connections[0].dropConnection(abort=True)  # as a crashed server would
        await within(factory.gone)
        for d in pending:
            error = await failure_of(d, 3)
            assert isinstance(error, WsfilesError) and error.code == "channel_closed", error
        await within(client.close(), 3)
    finally:
        await port.stopListening()


# -- 3. Disk full, permissions ------------------------------------------------


class _Delegate:
    """Passes every attribute it does not define to the wrapped object."""

    def __init__(self, inner: Any) -> None:
        object.__setattr__(self, "_inner", inner)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __setattr__(self, name: str, value: Any) -> None:
        # Callers may set hooks on the objects they are handed (upload callbacks).
        setattr(self._inner, name, value)


@implementer(IUpload)
class _FillingUpload(_Delegate):
    """Stores bytes until the (pretend) disk is full, then fails like ENOSPC."""

    def __init__(self, inner: Any, room: int) -> None:
        super().__init__(inner)
        object.__setattr__(self, "_room", room)

    def write(self, data: bytes) -> None:
        if len(data) > self._room:
            self._inner.write(data[: self._room])
            object.__setattr__(self, "_room", 0)
            raise StorageFailure("No space left on device")
        object.__setattr__(self, "_room", self._room - len(data))
        self._inner.write(data)


@implementer(IFolder)
class _FillingFolder(_Delegate):
    def __init__(self, inner: Any, room: int) -> None:
        super().__init__(inner)
        object.__setattr__(self, "_room", room)

    def begin_upload(self, *args: Any, **kwargs: Any) -> Deferred:
        d = self._inner.begin_upload(*args, **kwargs)
        return d.addCallback(_FillingUpload, self._room)


@implementer(IStorage)
class DiskFullStorage(_Delegate):
    """LocalStorage whose uploads for ``client`` fail after ``room`` bytes."""

    def __init__(self, inner: LocalStorage, client: str | None, room: int) -> None:
        super().__init__(inner)
        object.__setattr__(self, "_client", client)
        object.__setattr__(self, "_room", room)

    def folder(self, client: str | None) -> Any:
        folder = self._inner.folder(client)
        return _FillingFolder(folder, self._room) if client == self._client else folder


@pytest_twisted.ensureDeferred
async def test_disk_full_fails_one_upload_and_spares_the_rest(tmp_path):
    root = tmp_path / "root"
    users, tokens = make_users(tmp_path / "users", "alice", "bob")
    srv = await start_site(root, DiskFullStorage(LocalStorage(str(root)), "alice", MiB), users)
    try:
        alice = await srv.connect(tokens["alice"])
        bob = await srv.connect(tokens["bob"])
        v1 = blob(200_000, seed=4)
        await within(alice.upload("report.bin", v1))
        alice_v2, bob_v2 = blob(4 * MiB, seed=5), blob(4 * MiB, seed=6)
        results = await within(
            defer.DeferredList(
                [
                    defer.ensureDeferred(alice.upload("report.bin", alice_v2)),
                    defer.ensureDeferred(bob.upload("report.bin", bob_v2)),
                ],
                consumeErrors=True,
            )
        )
        (alice_ok, alice_result), (bob_ok, bob_result) = results
        assert not alice_ok and alice_result.check(WsfilesError), alice_result
        assert alice_result.value.code == "storage_error"
        assert "No space left on device" in alice_result.value.message
        assert bob_ok, bob_result
        assert bob_result["sha256"] == hashlib.sha256(bob_v2).hexdigest()

        assert (root / "alice" / "report.bin").read_bytes() == v1
        assert (root / "bob" / "report.bin").read_bytes() == bob_v2
        assert temp_entries(root) == []
        # Alice's connection is still usable, and her old file still served.
        assert [(f["name"], f["size"]) for f in await within(alice.list())] == [
            ("report.bin", len(v1))
        ]
        assert await download(alice, "report.bin") == v1
        assert await download(bob, "report.bin") == bob_v2
    finally:
        await srv.stop()


async def check_unwritable_folder(tmp_path: Path, lock: Any, unlock: Any) -> None:
    """Saves into a folder the server cannot write get storage_error; nothing changes."""
    root = tmp_path / "root"
    users, tokens = make_users(tmp_path / "users", "alice")
    srv = await start_site(root, LocalStorage(str(root)), users)
    folder = root / "alice"
    try:
        alice = await srv.connect(tokens["alice"])
        v1 = blob(10_000, seed=7)
        await within(alice.upload("notes.bin", v1))
        lock(folder)
        try:
            code = await error_code(alice.upload("notes.bin", blob(20_000, seed=8)))
            assert code == "storage_error"
            assert await error_code(alice.upload("new.bin", b"data")) == "storage_error"
            assert temp_entries(root) == []
            assert await download(alice, "notes.bin") == v1
        finally:
            unlock(folder)
        assert (folder / "notes.bin").read_bytes() == v1
        assert sorted(os.listdir(folder)) == ["notes.bin"]
        # Writable again: saving works again on the same connection.
        await within(alice.upload("new.bin", b"data"))
    finally:
        await srv.stop()


@pytest_twisted.ensureDeferred
async def test_read_only_folder_gives_storage_error(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("running as root: permission bits do not stop root from writing")
    await check_unwritable_folder(
        tmp_path, lambda folder: folder.chmod(0o500), lambda folder: folder.chmod(0o700)
    )


def chattr(flag: str, path: Path) -> None:
    subprocess.run(["chattr", flag, str(path)], check=True, capture_output=True, timeout=10)


@pytest_twisted.ensureDeferred
async def test_immutable_folder_gives_storage_error(tmp_path):
    """The same as root: an immutable folder (chattr +i) refuses even root."""
    probe = tmp_path / "probe"
    probe.mkdir()
    try:
        chattr("+i", probe)
        chattr("-i", probe)
    except (OSError, subprocess.SubprocessError):
        pytest.skip("chattr +i is not available here (needs root and ext2/3/4, xfs, btrfs)")
    await check_unwritable_folder(
        tmp_path, lambda folder: chattr("+i", folder), lambda folder: chattr("-i", folder)
    )


@pytest_twisted.ensureDeferred
async def test_same_client_uploads_again_after_a_storage_error(tmp_path):
    root = tmp_path / "root"
    srv = await start_site(root, DiskFullStorage(LocalStorage(str(root)), None, MiB))
    try:
        client = await srv.connect()
        assert await error_code(client.upload("big.bin", blob(4 * MiB, seed=9))) == "storage_error"
        # docs/protocol.md: "After any error the connection stays usable".
        await within(client.upload("small.bin", b"fits"), 5)
        assert await download(client, "small.bin") == b"fits"
    finally:
        await srv.stop()


# -- 4. Racing saves of one name ----------------------------------------------


@pytest_twisted.ensureDeferred
async def test_concurrent_saves_of_one_name_never_mix(server):
    first, second = await server.connect(), await server.connect()
    timeline: list[tuple[int, str]] = []
    for index, client in enumerate((first, second)):
        received = client._received

        def logging(message: dict[str, Any], index: int = index, received: Any = received) -> None:
            timeline.append((index, message.get("op", "?")))
            received(message)

        client._received = logging  # type: ignore[method-assign]
    for round_ in range(3):
        del timeline[:]
        contents = [blob(6 * MiB, seed=100 + 2 * round_), blob(6 * MiB, seed=101 + 2 * round_)]
        results = await within(
            defer.DeferredList(
                [
                    defer.ensureDeferred(client.upload("shared.bin", data))
                    for client, data in zip((first, second), contents, strict=True)
                ],
                consumeErrors=True,
            ),
            30,
        )
        # Both transfers were in flight at once: each was "ready" before either ended.
        ops = [op for _, op in timeline]
        first_end = min(i for i, op in enumerate(ops) if op in ("ack", "error"))
        assert sorted(i for i, op in timeline[:first_end] if op == "ready") == [0, 1], timeline
        acked = [data for (ok, _), data in zip(results, contents, strict=True) if ok]
        for ok, result in results:
            assert ok or result.check(WsfilesError), result
        assert acked, results
        stored = (server.root / "shared.bin").read_bytes()
        assert stored in acked, "the file is a mix, or an upload that was not acked"
        assert await download(first, "shared.bin") == stored
        assert temp_entries(server.root) == []
        assert [f["name"] for f in await within(second.list())] == ["shared.bin"]


# -- 5. Names and symlinks ----------------------------------------------------

LOOK_ALIKES = [
    "\u00e9.txt",  # é, precomposed (NFC)
    "e\u0301.txt",  # e + combining acute (NFD)
    "A.txt",
    "\u0410.txt",  # CYRILLIC CAPITAL LETTER A
    "a.txt",
]


@pytest_twisted.ensureDeferred
async def test_look_alike_names_are_distinct_files(server):
    client = await server.connect()
    contents = {name: f"content of {name!a}".encode() for name in LOOK_ALIKES}
    for name, data in contents.items():
        await within(client.upload(name, data))
    listed = await within(client.list())
    assert [f["name"] for f in listed] == sorted(LOOK_ALIKES)
    for name, data in contents.items():
        assert await download(client, name) == data
        assert (server.root / name).read_bytes() == data


@pytest_twisted.ensureDeferred
async def test_names_of_255_bytes_accepted_256_refused(server):
    client = await server.connect()
    accepted = ["n" * 255, "\u00e9" * 127 + "x", "\U0001f600" * 63 + "abc", "\u20ac" * 85]
    for name in accepted:
        assert len(name.encode()) == 255
        await within(client.upload(name, name.encode()[:50]))
        assert await download(client, name) == name.encode()[:50]
    refused = ["n" * 256, "\u00e9" * 128, "\U0001f600" * 64, "\u20ac" * 85 + "x"]
    for name in refused:
        assert len(name.encode()) == 256
        assert await error_code(client.upload(name, b"x")) == "invalid_name"
        assert await error_code(client.download(name, io.BytesIO())) == "invalid_name"
    assert sorted(f["name"] for f in await within(client.list())) == sorted(accepted)


@pytest_twisted.ensureDeferred
async def test_symlinks_are_not_listed_followed_or_written_through(tmp_path):
    root = tmp_path / "root"
    users, tokens = make_users(tmp_path / "users", "alice", "bob")
    srv = await start_site(root, LocalStorage(str(root)), users)
    try:
        alice = await srv.connect(tokens["alice"])
        bob = await srv.connect(tokens["bob"])
        await within(alice.upload("mine.txt", b"alice's own"))
        await within(bob.upload("secret.txt", b"bob's secret"))
        outside = tmp_path / "outside.txt"
        outside.write_bytes(b"outside the root")
        folder = root / "alice"
        links = {
            "passwd": "/etc/passwd",
            "bobs-secret": "../bob/secret.txt",
            "up": "..",
            "outside": str(outside),
            "dangling": "/nonexistent/wsfiles-test",
        }
        for name, target in links.items():
            (folder / name).symlink_to(target)
        passwd_before = Path("/etc/passwd").read_bytes()

        assert [f["name"] for f in await within(alice.list())] == ["mine.txt"]
        for name in links:
            assert await error_code(alice.download(name, io.BytesIO())) == "not_found", name
            # Protocol 1.1's delete and rename do not act on them either.
            assert await error_code(alice.delete(name)) == "not_found", name
            assert await error_code(alice.rename(name, "taken.txt")) == "not_found", name
            assert (folder / name).is_symlink()
        await within(alice.upload("scratch.txt", b"scratch"))
        assert await error_code(alice.rename("scratch.txt", "outside")) == "exists"
        try:  # onto a symlink with overwrite: refused, or the link itself replaced
            await within(alice.rename("scratch.txt", "outside", overwrite=True))
        except WsfilesError as e:
            assert e.code == "exists", e
        assert outside.read_bytes() == b"outside the root"
        # Saving over a symlink replaces the link; its target is never written.
        # (Not over the /etc/passwd link: a regression would damage the system.)
        for name in ("bobs-secret", "up", "outside", "dangling"):
            data = f"alice's {name}".encode()
            await within(alice.upload(name, data))
            assert not (folder / name).is_symlink()
            assert stat.S_ISREG((folder / name).lstat().st_mode)
            assert (folder / name).read_bytes() == data
            assert await download(alice, name) == data
        assert (root / "bob" / "secret.txt").read_bytes() == b"bob's secret"
        assert outside.read_bytes() == b"outside the root"
        assert not Path("/nonexistent").exists()
        assert Path("/etc/passwd").read_bytes() == passwd_before
        assert (folder / "passwd").is_symlink()
        regular = [p.name for p in folder.iterdir() if stat.S_ISREG(p.lstat().st_mode)]
        assert {"mine.txt", "bobs-secret", "up", "outside", "dangling"} <= set(regular)
        assert sorted(f["name"] for f in await within(alice.list())) == sorted(regular)
        assert await download(bob, "secret.txt") == b"bob's secret"
        assert temp_entries(root) == []
    finally:
        await srv.stop()


# -- 6. Property-based: whatever a client sends ------------------------------

DOCS = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"
TERMINAL_OPS = {"list", "ack", "sent", "error", "deleted", "renamed"}


def allowed_vocabulary() -> tuple[set[str], set[str]]:
    """Server ops and error codes a client may see, as docs/protocol.md lists them."""
    text = DOCS.read_text(encoding="utf-8")
    errors_section = text.split("\n## Errors", 1)[1].split("\n## ", 1)[0]
    documented_codes = set(re.findall(r"^\|\s*`([a-z_]+)`\s*\|", errors_section, re.MULTILINE))
    assert documented_codes >= DOCUMENTED_CODES, "cannot read the error table of the docs"
    ops = SERVER_OPS | set(re.findall(r'←\s*\{"op":\s*"([a-z_]+)"', text))
    return ops, documented_codes


def check_message(
    message: Any, ops: set[str], codes: set[str], request_id: Any = "unknown"
) -> None:
    """One server message is well-formed; ``request_id`` is what it must echo, if known."""
    assert isinstance(message, dict) and message.get("op") in ops, message
    json.dumps(message, allow_nan=False).encode("utf-8")  # sendable as a text frame
    if message["op"] == "error":
        assert message.get("code") in codes, message
        assert message["code"] != "internal_error", message  # a server bug, by definition
        assert isinstance(message.get("message"), str), message
    # Notices about the file channel's misuse are about no command: they carry no id.
    notice = message.get("code") in ("wrong_channel", "unexpected_data")
    if request_id != "unknown" and message["op"] not in ("hello", "changed") and not notice:
        assert message.get("id") == request_id, (message, request_id)


def valid_id(value: Any) -> bool:
    return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


def fuzz_content(size: int) -> bytes:
    return (b"wsfiles fuzz " * (size // 13 + 1))[:size]


FUZZ_MAX_SIZE = 4096

json_leaves = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=12)
    | st.text(st.characters(codec=None, categories=["Cs"]), min_size=1, max_size=3)
)
json_values = st.recursive(
    json_leaves,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=10,
)


def weighted(*choices: tuple[int, Any]) -> Any:
    """One of the strategies, picked by weight (st.one_of would pick them evenly)."""
    pool = [strategy for weight, strategy in choices for _ in range(weight)]
    return st.integers(0, len(pool) - 1).flatmap(pool.__getitem__)


def mostly(valid: Any, junk: Any) -> Any:
    """``valid`` three times in four, else ``junk`` (shrinks towards ``valid``)."""
    return weighted((3, valid), (1, junk))


FUZZ_POOL = ["a", "b.txt", "\u00e9", "a", "b.txt", "\u00e9", "e\u0301", "\u0410", "n" * 255]
fuzz_names = mostly(
    st.sampled_from(FUZZ_POOL),
    st.sampled_from(
        ["..", ".", "", "x/y", "a\\b", "nul\x00", "\x7f", ".wsfiles-tmp", ".wsfiles-x", "n" * 256]
    )
    | st.text(max_size=16)
    | st.text(st.characters(codec=None), min_size=1, max_size=6)
    | json_values,
)


@st.composite
def structured_commands(draw: Any) -> dict[str, Any]:
    """Commands that look like the protocol's, with any field maybe wrong."""
    ops = st.sampled_from(["list", "get", "save", "save", "delete", "rename"])
    message: dict[str, Any] = {"op": draw(mostly(ops, st.text(max_size=8) | json_values))}
    optional = {
        "id": mostly(st.integers(0, 99) | st.text(max_size=4), json_values),
        "name": fuzz_names,
        "to": fuzz_names,
        "size": mostly(st.integers(0, 600), st.integers(-2, FUZZ_MAX_SIZE + 2) | json_values),
        "offset": mostly(st.integers(0, 300), json_values),
        "resume": mostly(st.booleans(), json_values),
        "overwrite": mostly(st.booleans(), json_values),
        "sha256": mostly(st.sampled_from(["correct", "wrong"]), json_values),
        "chunked": mostly(st.booleans(), json_values),
    }
    for key, strategy in optional.items():
        if key in ("id", "name", "size") or draw(st.integers(0, 3)) == 0:
            message[key] = draw(strategy)
    size = message.get("size")
    if message.get("sha256") == "correct" and isinstance(size, int) and size >= 0:
        message["sha256"] = hashlib.sha256(fuzz_content(size)).hexdigest()
    elif message.get("sha256") == "wrong":
        message["sha256"] = "0" * 64
    return message


structured = structured_commands().map(lambda m: json.dumps(m).encode())
fuzz_commands = weighted(
    (4, structured),
    (1, json_values.map(lambda v: json.dumps(v).encode())),
    (1, st.binary(max_size=40)),
    (1, st.text(max_size=40).map(str.encode)),
)

#: How the fake file channel answers "ready": what a client might do.
FEED_MODES = ["exact", "exact", "short", "long", "text-first", "close", "two-messages"]


@implementer(interfaces.IConsumer)
class FakeFileChannel:
    """A file channel without a network: no flow control, records what is sent."""

    def __init__(self) -> None:
        self.messages: list[bytes] = []
        self._current: list[bytes] | None = None

    def begin_message(self) -> FakeFileChannel:
        self._current = []
        return self

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        pass

    def unregisterProducer(self) -> None:
        pass

    def write(self, data: bytes) -> None:
        assert self._current is not None
        self._current.append(data)

    def end_message(self) -> None:
        assert self._current is not None
        self.messages.append(b"".join(self._current))
        self._current = None

    def abort(self, code: int, reason: str) -> None:
        self.aborted = True

    def close(self) -> None:
        self.aborted = True

    aborted = False


def _sync_deferToThread(f: Any, *args: Any, **kwargs: Any) -> Deferred:
    return defer.maybeDeferred(f, *args, **kwargs)


class SessionDriver:
    """Drives a real CommandSession over a real LocalStorage, like the protocols do."""

    def __init__(self, root: Path) -> None:
        self.clock = Clock()
        self.storage = LocalStorage(str(root))
        self.registry = PairingRegistry(self.clock, channel_timeout=5)
        self.sent: list[dict[str, Any]] = []
        self.closed_with: tuple[int, str] | None = None
        self.session_settings = Settings(max_size=FUZZ_MAX_SIZE)
        self.session = CommandSession(
            "anonymous",
            self.storage.folder(None),
            self.registry,
            self.session_settings,
            self.sent.append,
            clock=self.clock,
            close_connection=lambda code, reason: setattr(self, "closed_with", (code, reason)),
        )
        self.channel: FakeFileChannel | None = None
        self.session.start()

    def attach(self, url: str) -> None:
        holder = self.registry.redeem(url.split("ticket=", 1)[1])
        assert holder is self.session
        self.channel = FakeFileChannel()
        self.session.claim(self.channel)
        self.session.attach(self.channel)

    def drop_channel(self) -> None:
        """The file channel's connection ends (the client hung up, or the server cut it)."""
        channel, self.channel = self.channel, None
        if channel is not None:
            self.session.detach(channel)

    def message(self, data: bytes, *, binary: bool = True, cut_after: int | None = None) -> None:
        """One message on the file channel, in frames of up to 1000 bytes, as
        FileChannelProtocol delivers it; ``cut_after``: the client hangs up after that many."""
        channel = self.channel
        if channel is None:
            return
        self.session.file_message_begin(channel, binary)
        for i in range(0, max(len(data), 1), 1000):
            chunk = data[i : i + 1000]
            if not self.session.file_frame_begin(channel, len(chunk)) or channel.aborted:
                self.drop_channel()  # closed by the server (1009)
                return
            if chunk:
                self.session.file_data(channel, chunk)
            if cut_after is not None and i + len(chunk) >= cut_after:
                self.drop_channel()
                return
        self.session.file_message_end(channel)
        if channel.aborted:
            self.drop_channel()

    def feed(self, size: int, mode: str) -> None:
        """Send the data of an upload ``ready`` for ``size`` bytes, the way ``mode`` says."""
        data = fuzz_content(size)
        if mode == "text-first":
            self.message(b"text", binary=False)
        if mode == "short":
            data = data[:-1]
        elif mode == "long":
            data += b"!"
        if mode == "close":
            self.message(data, cut_after=size // 2)
        elif mode == "two-messages":
            self.message(data[: size // 2])
            self.message(data[size // 2 :])
        else:
            self.message(data)

    def command(self, payload: bytes, mode: str) -> list[dict[str, Any]]:
        """Send one command and play the client's part until it is answered.

        A client that sends nothing more (a chunked save cut short) is left to
        the stall deadline: the fake clock jumps past it once.
        """
        before = handled = len(self.sent)
        self.session.text_received(payload)
        waited = False
        for _ in range(20):
            if self.channel is not None and self.channel.aborted:
                self.drop_channel()
            new = self.sent[handled:]
            handled = len(self.sent)
            if new:
                last = new[-1]
                if last["op"] == "channel":
                    self.attach(last["url"])
                elif last["op"] == "ready":
                    self.feed(json.loads(payload)["size"] - last.get("offset", 0), mode)
            elif self.sent[before:] and self.sent[-1]["op"] not in TERMINAL_OPS and not waited:
                waited = True
                self.clock.advance(self.session_settings.stall_timeout + 1)
            else:
                break
        return self.sent[before:]


def snapshot(folder: Path, skip: Path) -> dict[str, tuple[int, bytes | None]]:
    """Every path under ``folder`` except ``skip``'s subtree: mode and contents."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        if Path(dirpath) == skip.parent:
            dirnames[:] = [d for d in dirnames if d != skip.name]
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            st_ = path.lstat()
            content = path.read_bytes() if stat.S_ISREG(st_.st_mode) else None
            found[str(path)] = (st_.st_mode, content)
    return found


@settings(max_examples=200, deadline=None, database=None)
@given(
    script=st.lists(st.tuples(fuzz_commands, st.sampled_from(FEED_MODES)), max_size=12),
    seed_files=st.lists(st.sampled_from(["a", "b.txt", "\u00e9"]), max_size=3, unique=True),
)
def test_session_answers_anything_and_stays_in_its_folder(script, seed_files):
    from twisted.logger import globalLogPublisher

    base = Path(tempfile.mkdtemp(prefix="wsfiles-fuzz-"))
    failures: list[Any] = []

    def observer(event: dict[str, Any]) -> None:
        # Tracebacks the server logs (not other tests' garbage-collected Deferreds).
        if "log_failure" in event and event.get("log_namespace", "").startswith("wsfiles"):
            failures.append(event["log_failure"])

    globalLogPublisher.addObserver(observer)
    try:
        root = base / "root"
        (base / "outside").mkdir()
        (base / "outside" / "keep.txt").write_bytes(b"not yours")
        (base / "sibling.txt").write_bytes(b"not yours either")
        root.mkdir()
        for name in seed_files:
            (root / name).write_bytes(fuzz_content(300))
        before = snapshot(base, root)
        synchronous = SimpleNamespace(deferToThread=_sync_deferToThread)
        with mock.patch("wsfiles.storage.local.threads", synchronous):
            driver = SessionDriver(root)
            hello = driver.sent[0]
            assert hello["op"] == "hello"
            ops, codes = allowed_vocabulary()
            for payload, mode in script:
                replies = driver.command(payload, mode)
                assert replies, f"no answer to {payload!r}"
                try:
                    message = json.loads(payload)
                except (ValueError, RecursionError):
                    message = None
                request_id: Any = None
                if isinstance(message, dict):
                    request_id = message.get("id") if valid_id(message.get("id")) else None
                for reply in replies:
                    check_message(reply, ops, codes, request_id)
                assert replies[-1]["op"] in TERMINAL_OPS, replies
                event(
                    "answer: "
                    + " ".join(r["op"] if r["op"] != "error" else r["code"] for r in replies)
                )
                if replies[-1]["op"] == "sent":
                    assert driver.channel is not None
                    name, offset = message["name"], message.get("offset", 0)
                    assert driver.channel.messages[-1] == (root / name).read_bytes()[offset:]
                assert driver.closed_with is None
            driver.session.close()
        assert not failures, failures
        assert snapshot(base, root) == before, "something was written outside the root"
        # Plain uploads leave nothing in the temp folder once answered (kept
        # partials of interrupted resumable ones live elsewhere, by design).
        assert temp_entries(root) == [], "an answered upload left its temp file"
        for entry in os.scandir(root):
            if entry.name.startswith(RESERVED_PREFIX):  # the server's own bookkeeping
                assert entry.is_dir(follow_symlinks=False), entry
            else:
                assert entry.is_file(follow_symlinks=False), entry
                check_file_name(entry.name)
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                assert not Path(dirpath, name).is_symlink()
    finally:
        globalLogPublisher.removeObserver(observer)
        shutil.rmtree(base, ignore_errors=True)


class Recorder:
    """Every message a client's command channel receives, and waits for one."""

    def __init__(self, client: WsfilesClient) -> None:
        self.messages: list[dict[str, Any]] = []
        self._waiting: list[tuple[Any, Deferred]] = []
        client._received = self._record  # type: ignore[method-assign]

    def _record(self, message: dict[str, Any]) -> None:
        self.messages.append(message)
        for entry in list(self._waiting):
            predicate, d = entry
            if predicate(message):
                self._waiting.remove(entry)
                d.callback(message)

    def wait_for(self, predicate: Any) -> Deferred:
        d: Deferred = Deferred()
        self._waiting.append((predicate, d))
        return d


e2e_frames = weighted(
    (3, structured_commands().map(json.dumps)),
    (1, json_values.map(json.dumps)),
    (1, st.text(max_size=60)),
)


@settings(
    max_examples=30,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(frames=st.lists(e2e_frames, min_size=1, max_size=8))
@pytest_twisted.ensureDeferred
async def test_server_answers_any_text_frame_and_stays_open(server, frames):
    client = await within(connect(server.url))
    try:
        ops, codes = allowed_vocabulary()
        recorder = Recorder(client)
        for frame in frames:
            client.send_text(frame)
        probe = "probe-after-fuzz"
        client.send_text(json.dumps({"op": "list", "id": probe}))
        answer = await within(
            recorder.wait_for(lambda m: m.get("id") == probe and m.get("op") != "channel")
        )
        assert answer["op"] == "list", answer
        assert client.close_code is None, "the server closed the command channel"
        assert recorder.messages, "no answer at all"
        for message in recorder.messages:
            check_message(message, ops, codes)
    finally:
        await server.close_client(client)
