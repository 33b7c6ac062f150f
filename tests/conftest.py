"""Shared fixtures: an in-process server, a real twistd server, and a dirty-reactor check."""

from __future__ import annotations

import hashlib
import io
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, endpoints, interfaces, protocol, reactor
from twisted.internet.defer import Deferred
from twisted.protocols import policies
from zope.interface import implementer

from wsfiles.client import WsfilesClient, connect
from wsfiles.config import Settings
from wsfiles.storage.local import LocalStorage
from wsfiles.users import UserDirectory
from wsfiles.web import WsfilesSite

BIN = Path(sys.executable).parent
TEARDOWN_TIMEOUT = 10.0


def _with_timeout(awaitable: Any, seconds: float) -> Deferred:
    return defer.ensureDeferred(awaitable).addTimeout(seconds, reactor)


# -- the dirty-reactor check --------------------------------------------------


def _is_waker(selectable: Any) -> bool:
    """The reactor's own wakers appear when it starts: they are not leaks."""
    return "Waker" in type(selectable).__name__


def _is_batch_tick(call: Any) -> bool:
    """txaio's batched timer (Autobahn's auto-ping) keeps one shared tick per
    time bucket; cancelling a ping timeout empties the bucket but leaves the
    tick, which then fires as a no-op.  Not a leak of ours."""
    return "_notify_bucket" in repr(call)


@pytest.fixture(autouse=True)
def clean_reactor():
    """Fail a test that leaves delayed calls, sockets or processes behind."""
    readers = set(reactor.getReaders())
    writers = set(reactor.getWriters())
    yield
    leftovers = []
    calls = [c for c in reactor.getDelayedCalls() if c.active() and not _is_batch_tick(c)]
    if calls:
        leftovers.append(f"delayed calls: {calls}")
        for call in calls:
            call.cancel()
    new_readers = {r for r in set(reactor.getReaders()) - readers if not _is_waker(r)}
    new_writers = {w for w in set(reactor.getWriters()) - writers if not _is_waker(w)}
    if new_readers or new_writers:
        leftovers.append(f"selectables: {new_readers | new_writers}")
        for selectable in new_readers | new_writers:
            reactor.removeReader(selectable)
            reactor.removeWriter(selectable)
            getattr(selectable, "abortConnection", lambda: None)()
    assert not leftovers, "dirty reactor: " + "; ".join(leftovers)


# -- an in-process server -----------------------------------------------------


class _TrackedConnection(policies.ProtocolWrapper):
    def connectionMade(self) -> None:
        self.lost: Deferred = Deferred()
        super().connectionMade()

    def connectionLost(self, reason: Any) -> None:
        super().connectionLost(reason)
        self.lost.callback(None)


class _TrackingFactory(policies.WrappingFactory):
    """Remembers server-side connections so teardown can wait for each to end."""

    protocol = _TrackedConnection


@dataclass
class InProcessServer:
    site: WsfilesSite
    root: Path
    url: str
    port: Any
    tracker: _TrackingFactory
    clients: list[WsfilesClient] = field(default_factory=list)
    #: What an interrupted transfer could have left behind (see leftovers()).
    leftover_probe: Any = None
    backend: str = "local"

    # -- the anonymous folder, through the storage interface (any backend) --

    @property
    def storage(self) -> Any:
        return self.site.storage

    async def put(self, name: str, data: bytes) -> None:
        """Store a file directly, as an earlier client would have."""
        upload = await self.storage.folder(None).begin_upload(name, len(data))
        pending = upload.write(data)
        if pending is not None:
            await pending
        await upload.commit()

    async def read(self, name: str) -> bytes | None:
        """A stored file's bytes, or None."""
        from wsfiles.storage import NotFound

        try:
            download = await self.storage.folder(None).open_download(name)
        except NotFound:
            return None
        sink = _BytesConsumer()
        try:
            await download.stream_to(sink, hashlib.sha256())
        finally:
            download.close()
        return sink.getvalue()

    async def exists(self, name: str) -> bool:
        return name in {info.name for info in await self.storage.folder(None).list()}

    async def stored(self) -> dict[str, bytes]:
        """Every file of the anonymous folder, with its bytes."""
        names = [info.name for info in await self.storage.folder(None).list()]
        return {name: await self.read(name) for name in names}  # type: ignore[misc]

    async def leftovers(self) -> list[str]:
        """Temporary files (local) or unfinished uploads (S3): none after a transfer."""
        if self.leftover_probe is not None:
            await self.storage.client.idle()  # aborts go out in the background
            return self.leftover_probe()
        temp = self.root / ".wsfiles-tmp"
        return sorted(str(p.relative_to(temp)) for p in temp.rglob("*") if not p.is_dir())

    async def connect(self, token: str | None = None, **kwargs: Any) -> WsfilesClient:
        client = await connect(self.url, token, **kwargs)
        self.clients.append(client)
        return client

    async def close_client(self, client: WsfilesClient) -> None:
        """Close ``client`` and wait until the server has seen its connections end."""
        ports = {
            proto.transport.getHost().port
            for proto in (client._command, client._file)
            if proto is not None and proto.transport is not None
        }
        ours = [w for w in self.tracker.protocols if w.transport.getPeer().port in ports]
        await _with_timeout(client.close(), TEARDOWN_TIMEOUT)
        await _with_timeout(defer.gatherResults([w.lost for w in ours]), TEARDOWN_TIMEOUT)
        if client in self.clients:
            self.clients.remove(client)

    def folder(self, client: str | None = None) -> Path:
        return self.root if client is None else self.root / client

    async def stop(self) -> None:
        for client in self.clients:
            await _with_timeout(client.close(), TEARDOWN_TIMEOUT)
        await self.port.stopListening()
        lost = [wrapper.lost for wrapper in list(self.tracker.protocols)]
        await _with_timeout(defer.gatherResults(lost), TEARDOWN_TIMEOUT)


@implementer(interfaces.IConsumer)
class _BytesConsumer(io.BytesIO):
    def registerProducer(self, producer: Any, streaming: bool) -> None:
        pass

    def unregisterProducer(self) -> None:
        pass


async def start_server(
    root: Path, *, users: UserDirectory | None = None, storage: Any = None, **settings: Any
) -> InProcessServer:
    storage = storage if storage is not None else LocalStorage(str(root))
    site = WsfilesSite(Settings(**settings), storage, users, reactor)
    tracker = _TrackingFactory(site)
    port = await endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(tracker)
    url = f"ws://127.0.0.1:{port.getHost().port}"
    return InProcessServer(site, root, url, port, tracker)


async def start_s3_server(rgw: Any, root: Path, **settings: Any) -> InProcessServer:
    """A server whose files live in a fresh bucket of the Ceph RGW."""
    import secrets
    import xml.etree.ElementTree as ElementTree

    from wsfiles.storage.s3 import S3Client, S3Storage

    bucket = "wsfiles-" + secrets.token_hex(6)
    rgw.create_bucket(bucket)
    client = S3Client(reactor, rgw.endpoint, bucket, rgw.access_key, rgw.secret_key)
    srv = await start_server(root, storage=S3Storage(client), **settings)
    srv.backend = "s3"

    def unfinished_uploads() -> list[str]:
        response = rgw.request("GET", bucket, query={"uploads": ""})
        assert response.status == 200, response.body
        root = ElementTree.fromstring(response.body)
        return [e.text or "" for e in root.iter() if e.tag.endswith("UploadId")]

    srv.leftover_probe = unfinished_uploads
    return srv


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Tests in a module marked ``every_backend`` run once per storage backend."""
    if "backend" in metafunc.fixturenames and metafunc.definition.get_closest_marker(
        "every_backend"
    ):
        metafunc.parametrize("backend", ["local", "s3"], indirect=True)


@pytest.fixture
def backend(request):
    """The storage under ``server``/``server_factory``: None for local folders,
    else a Ceph RGW (S3).  Local unless the module is marked ``every_backend``."""
    if getattr(request, "param", "local") == "s3":
        request.node.add_marker(pytest.mark.timeout(300))  # the first pays for Ceph
        return request.getfixturevalue("ceph_rgw")
    return None


@pytest.fixture
def server_factory(backend, tmp_path):
    """Start servers with custom settings; all are stopped at teardown."""
    started: list[InProcessServer] = []

    async def factory(**kwargs: Any) -> InProcessServer:
        root = tmp_path / f"root{len(started)}"
        if backend is None:
            srv = await start_server(root, **kwargs)
        else:
            srv = await start_s3_server(backend, root, **kwargs)
        started.append(srv)
        return srv

    yield factory
    for srv in started:
        pytest_twisted.blockon(Deferred.fromCoroutine(srv.stop()))
        close = getattr(srv.storage, "close", None)
        if close is not None:
            pytest_twisted.blockon(close())


@pytest_twisted.async_yield_fixture
async def server(server_factory):
    yield await server_factory()


# -- a real twistd process ----------------------------------------------------


class _TwistdProtocol(protocol.ProcessProtocol):
    def __init__(self) -> None:
        self.output = b""
        self.listening: Deferred = Deferred()
        self.ended: Deferred = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data
        if not self.listening.called and b"wsfiles listening on " in self.output:
            line = self.output.split(b"wsfiles listening on ", 1)[1].split(b"\n", 1)[0]
            host_port = line.split(b" ", 1)[0].decode()
            self.listening.callback(host_port)

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        if not self.listening.called:
            self.listening.errback(RuntimeError(f"twistd exited:\n{self.output.decode()}"))
        # twistd re-raises the signal that stopped it: SIGTERM ends it "by signal".
        value = reason.value
        self.ended.callback(value.exitCode if value.exitCode is not None else -value.signal)


@dataclass
class TwistdServer:
    process: Any
    proto: _TwistdProtocol
    url: str
    root: Path
    exit_code: int | None = None

    @property
    def output(self) -> str:
        return self.proto.output.decode(errors="replace")

    async def stop(self) -> int | None:
        """SIGTERM, then the exit code, or -SIGNAL (later calls just return it)."""
        if self.exit_code is None:
            if not self.proto.ended.called:  # it may have been killed by the test
                self.process.signalProcess("TERM")
            self.exit_code = await _with_timeout(self.proto.ended, TEARDOWN_TIMEOUT)
        return self.exit_code

    async def kill(self) -> None:
        self.process.signalProcess("KILL")
        self.exit_code = await _with_timeout(self.proto.ended, TEARDOWN_TIMEOUT)


def twistd_args(*args: str) -> list[str]:
    return [str(BIN / "twistd"), "--nodaemon", "--pidfile=", "--logfile=-", "wsfiles", *args]


async def start_twistd(root: Path, *args: str, cwd: Path | None = None) -> TwistdServer:
    proto = _TwistdProtocol()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    argv = twistd_args("--listen", "tcp:0:interface=127.0.0.1", "--root", str(root), *args)
    process = reactor.spawnProcess(proto, argv[0], argv, env=env, path=str(cwd or root.parent))
    try:
        host_port = await _with_timeout(proto.listening, 30)
    except Exception:
        if not proto.ended.called:
            process.signalProcess("KILL")
            await proto.ended
        raise
    return TwistdServer(process, proto, f"ws://{host_port}", root)


@pytest.fixture
def twistd_factory(tmp_path):
    started: list[TwistdServer] = []

    async def factory(*args: str, root: Path | None = None) -> TwistdServer:
        srv = await start_twistd(root or tmp_path / "twistd-root", *args)
        started.append(srv)
        return srv

    yield factory
    for srv in started:
        pytest_twisted.blockon(Deferred.fromCoroutine(srv.stop()))


# -- other processes (CLI, example clients) -------------------------------------


def add_user_with_cli(users: Path, name: str) -> str:
    """``wsfiles user add`` as an operator runs it; the token it prints."""
    import subprocess

    result = subprocess.run(
        [str(BIN / "wsfiles"), "user", "add", "--users", str(users), name],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return result.stdout.strip()


class ChildOutput(protocol.ProcessProtocol):
    """A child's merged output and its exit code (or -SIGNAL); ``ended`` and
    ``wait_for`` hand out fresh Deferreds, safe to time out and ask again."""

    def __init__(self) -> None:
        self.output = b""
        self.exit_code: int | None = None
        self._enders: list[Deferred] = []
        self._markers: list[tuple[bytes, Deferred]] = []

    def ended(self) -> Deferred:
        """A new Deferred that fires with the exit code (safe to time out and ask again)."""
        if self.exit_code is not None:
            return defer.succeed(self.exit_code)
        ender: Deferred = Deferred()
        self._enders.append(ender)
        return ender

    def wait_for(self, marker: bytes) -> Deferred:
        """Fires once ``marker`` has appeared in the output; fails if the child ends first."""
        if marker in self.output:
            return defer.succeed(None)
        seen: Deferred = Deferred()
        self._markers.append((marker, seen))
        return seen

    def childDataReceived(self, fd: int, data: bytes) -> None:
        self.output += data
        for marker, seen in list(self._markers):
            if marker in self.output:
                self._markers.remove((marker, seen))
                seen.callback(None)

    def processEnded(self, reason: Any) -> None:
        value = reason.value
        for marker, seen in self._markers:
            seen.errback(AssertionError(f"ended before {marker!r}:\n{self.text}"))
        self._markers = []
        self.exit_code = value.exitCode if value.exitCode is not None else -value.signal
        for ender in self._enders:
            ender.callback(self.exit_code)
        self._enders = []

    @property
    def text(self) -> str:
        return self.output.decode(errors="replace")


class _Collect(protocol.ProcessProtocol):
    def __init__(self) -> None:
        self.out = b""
        self.err = b""
        self.ended: Deferred = Deferred()
        self._watchers: list[tuple[bytes, Deferred]] = []

    def when_output_contains(self, marker: bytes) -> Deferred:
        """Fires once stdout contains ``marker`` (fails if the process ends first)."""
        if marker in self.out:
            return defer.succeed(None)
        waiter: Deferred = Deferred()
        self._watchers.append((marker, waiter))
        return waiter

    def outReceived(self, data: bytes) -> None:
        self.out += data
        for watcher in list(self._watchers):
            if watcher[0] in self.out:
                self._watchers.remove(watcher)
                watcher[1].callback(None)

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason: Any) -> None:
        code = reason.value.exitCode
        for _, waiter in self._watchers:
            waiter.errback(RuntimeError(f"the process ended: {self.out!r} {self.err!r}"))
        self.ended.callback(code if code is not None else -reason.value.signal)


def spawn_process(argv: list[str], env: dict | None = None, cwd: Path | None = None):
    """Start ``argv`` on the reactor; return the process and its output collector."""
    proto = _Collect()
    full_env = {**os.environ, **(env or {})}
    process = reactor.spawnProcess(proto, argv[0], argv, env=full_env, path=str(cwd or "."))
    return process, proto


async def run_process(argv: list[str], **kwargs: Any) -> tuple[int, str, str]:
    """Run ``argv`` to its end without blocking the reactor: (exit code, stdout, stderr)."""
    _, proto = spawn_process(argv, **kwargs)
    code = await _with_timeout(proto.ended, 60)
    return code, proto.out.decode(), proto.err.decode()


# -- raw handshakes -----------------------------------------------------------

UPGRADE_HEADERS = {
    "Connection": ["Upgrade"],
    "Upgrade": ["websocket"],
    "Sec-WebSocket-Version": ["13"],
    "Sec-WebSocket-Key": ["dGhlIHNhbXBsZSBub25jZQ=="],
}


class _StatusLine(protocol.Protocol):
    """Sends one request, reads the status line, hangs up, and waits for the close."""

    def __init__(self, request: bytes) -> None:
        self._request = request
        self._buffer = b""
        self.status: Deferred = Deferred()
        self.lost: Deferred = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self._request)

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        if not self.status.called and b"\r\n" in self._buffer:
            self.status.callback(int(self._buffer.split(b" ", 2)[1]))
            self.transport.loseConnection()

    def connectionLost(self, reason: Any) -> None:
        if not self.status.called:
            self.status.errback(RuntimeError(f"closed without a status line: {self._buffer!r}"))
        self.lost.callback(None)


class _WholeResponse(protocol.Protocol):
    """HTTP/1.0 with Connection: close: the response is everything until the close."""

    def __init__(self, request: bytes) -> None:
        self._request = request
        self.data = b""
        self.lost: Deferred = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self._request)

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Any) -> None:
        self.lost.callback(self.data)


async def http_get(url: str) -> tuple[int, bytes]:
    """GET ``http://host:port/path``: (status, body); the connection is closed when it returns."""
    host_port, _, path = url.split("://", 1)[1].partition("/")
    host, port = host_port.rsplit(":", 1)
    request = f"GET /{path} HTTP/1.0\r\nHost: {host_port}\r\nConnection: close\r\n\r\n"
    endpoint = endpoints.TCP4ClientEndpoint(reactor, host, int(port))
    peer = await endpoints.connectProtocol(endpoint, _WholeResponse(request.encode()))
    data = await _with_timeout(peer.lost, TEARDOWN_TIMEOUT)
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


async def http_request(
    server_url: str,
    path: str,
    method: str = "GET",
    token: str | None = None,
    version: str = "1.1",
    **headers: str,
) -> tuple[int, dict[str, list[str]], bytes]:
    """One request to the server at ``server_url`` (ws:// or http://) with
    Connection: close: (status, headers by lower-case name, body).  Header
    arguments use ``_`` for ``-`` (``if_range="..."``); ``token`` goes in
    ``Authorization: Bearer``."""
    host_port = server_url.split("://", 1)[1].split("/", 1)[0]
    host, port = host_port.rsplit(":", 1)
    sent = {"Host": host_port, "Connection": "close"}
    sent.update({name.replace("_", "-"): value for name, value in headers.items()})
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    lines = [f"{method} {path} HTTP/{version}", *(f"{k}: {v}" for k, v in sent.items())]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    endpoint = endpoints.TCP4ClientEndpoint(reactor, host, int(port))
    peer = await endpoints.connectProtocol(endpoint, _WholeResponse(request))
    data = await _with_timeout(peer.lost, TEARDOWN_TIMEOUT)
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    received: dict[str, list[str]] = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        received.setdefault(name.strip().lower(), []).append(value.strip())
    return int(status_line.split(" ", 2)[1]), received, body


async def handshake_status(ws_url: str, path: str, headers: dict | None = None) -> int:
    """The HTTP status a WebSocket opening handshake to ``path`` gets."""
    host, port = ws_url.split("://", 1)[1].rsplit(":", 1)
    all_headers = {"Host": [f"{host}:{port}"], **UPGRADE_HEADERS, **(headers or {})}
    lines = [f"GET {path} HTTP/1.1"]
    lines += [f"{name}: {value}" for name, values in all_headers.items() for value in values]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    endpoint = endpoints.TCP4ClientEndpoint(reactor, host, int(port))
    peer = await endpoints.connectProtocol(endpoint, _StatusLine(request))
    try:
        return await _with_timeout(peer.status, TEARDOWN_TIMEOUT)
    finally:
        await _with_timeout(peer.lost, TEARDOWN_TIMEOUT)


# -- a real object store (Ceph RGW), once per session --------------------------


@pytest.fixture(scope="session")
def ceph_rgw(tmp_path_factory):
    from cluster.ceph import ceph_rgw_session

    yield from ceph_rgw_session(tmp_path_factory.mktemp("ceph"))


@pytest.fixture
def redis_server(tmp_path):
    """A fresh redis-server on a free loopback port (skips when it is not installed)."""
    from cluster import free_port
    from cluster.redis import REDIS_SERVER, RedisServer

    if not os.path.exists(REDIS_SERVER):
        pytest.skip("redis-server is not installed")
    server = RedisServer(tmp_path / "redis", free_port())
    server.start()
    yield server
    server.stop()
