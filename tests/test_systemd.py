"""The systemd units in contrib/systemd, and wsfiles under systemd's ways of starting it.

- ``systemd-analyze verify`` and ``security --offline=yes`` on the unit files;
- socket activation for real, with ``systemd-socket-activate``;
- a restart that keeps the listening socket (what wsfiles.socket gives);
- sd_notify: READY=1 once listening, STOPPING=1 on SIGTERM;
- the service under the system call filter MemoryDenyWriteExecute= installs.

No systemd needs to run. Every wait is on an event and bounded.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import re
import shutil
import socket
import sys
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from cluster import free_port
from conftest import BIN, TEARDOWN_TIMEOUT, ChildOutput, run_process
from twisted.internet import defer, protocol, reactor
from twisted.internet.defer import Deferred, DeferredQueue

from wsfiles import systemd
from wsfiles.client import connect

UNITS = Path(__file__).resolve().parent.parent / "contrib" / "systemd"
SERVICES = ["wsfiles.service", "wsfiles-standalone.service"]
TWISTD = BIN / "twistd"
START_TIMEOUT = 30.0
MiB = 1024 * 1024

needs_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze is not installed (Debian: apt-get install systemd)",
)
needs_activate = pytest.mark.skipif(
    shutil.which("systemd-socket-activate") is None,
    reason="systemd-socket-activate is not installed (Debian: apt-get install systemd)",
)


def within(awaitable: Any, seconds: float = START_TIMEOUT) -> Deferred:
    return defer.ensureDeferred(awaitable).addTimeout(seconds, reactor)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def round_trip(url: str, size: int) -> None:
    """Upload ``size`` random bytes through ``url``, download them, compare SHA-256s."""
    data = os.urandom(size)
    client = await within(connect(url))
    try:
        ack = await within(client.upload("blob.bin", data))
        sink = io.BytesIO()
        sent = await within(client.download("blob.bin", sink))
    finally:
        await within(client.close(), TEARDOWN_TIMEOUT)
    assert ack["sha256"] == sent["sha256"] == sha256(sink.getvalue()) == sha256(data)


# -- processes ------------------------------------------------------------------


class Child:
    """A process started on the reactor; ``stop`` SIGTERMs it and waits for the end."""

    def __init__(self, argv: list[str], env: dict[str, str], **kwargs: Any) -> None:
        self.proto = ChildOutput()
        self._terminated = False
        self.process = reactor.spawnProcess(self.proto, argv[0], argv, env=env, **kwargs)

    def terminate(self) -> None:
        """SIGTERM, once (a second one makes twistd log a traceback)."""
        if not self._terminated and self.proto.exit_code is None:
            self._terminated = True
            self.process.signalProcess("TERM")

    async def stop(self) -> int:
        """SIGTERM, then the exit code or -SIGNAL (later calls just return it)."""
        if self.proto.exit_code is None:
            self.terminate()
            await within(self.proto.ended(), TEARDOWN_TIMEOUT)
        assert self.proto.exit_code is not None
        return self.proto.exit_code

    async def kill(self) -> None:
        """Teardown after a failure: never leave a process behind."""
        if self.proto.exit_code is None:
            self.process.signalProcess("KILL")
            await within(self.proto.ended(), TEARDOWN_TIMEOUT)


def wsfiles_argv(*args: str) -> list[str]:
    return [str(TWISTD), "--nodaemon", "--pidfile=", "wsfiles", *args]


# -- sd_notify --------------------------------------------------------------------


class _Datagrams(protocol.DatagramProtocol):
    def __init__(self) -> None:
        self.received: DeferredQueue = DeferredQueue()

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        self.received.put(data.decode())


async def listen_notify(path: Path) -> tuple[Any, _Datagrams]:
    """A NOTIFY_SOCKET as systemd makes it: AF_UNIX, SOCK_DGRAM, read by the reactor."""
    assert len(os.fsencode(path)) < 108, f"AF_UNIX path too long: {path}"
    datagrams = _Datagrams()
    port = reactor.listenUNIXDatagram(str(path), datagrams)
    return port, datagrams


def test_notify_is_a_no_op_without_notify_socket(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.notify("READY=1") is False


def test_notify_reaches_an_abstract_namespace_socket(monkeypatch):
    name = f"wsfiles-test-{os.getpid()}-{os.urandom(4).hex()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind("\0" + name)
        listener.setblocking(False)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert systemd.notify("READY=1") is True
        # A local datagram is queued before send() returns: no waiting needed.
        assert listener.recv(4096) == b"READY=1"


def test_notify_to_a_missing_socket_says_false(monkeypatch, tmp_path):
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody"))
    assert systemd.notify("READY=1") is False


@pytest_twisted.ensureDeferred
async def test_sd_notify_ready_then_stopping(tmp_path):
    port, datagrams = await listen_notify(tmp_path / "notify")
    listen = free_port()
    env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify"), "PYTHONUNBUFFERED": "1"}
    argv = wsfiles_argv("--listen", f"tcp:{listen}:interface=127.0.0.1", "--root", "root")
    child = Child(argv, env, path=str(tmp_path))
    try:
        assert await within(datagrams.received.get()) == "READY=1", child.proto.text
        # READY=1 means ready: the listener takes a client at once.
        await round_trip(f"ws://127.0.0.1:{listen}", 64 * 1024)
        child.terminate()
        assert await within(datagrams.received.get(), TEARDOWN_TIMEOUT) == "STOPPING=1"
        assert await child.stop() in (0, -15)  # twistd re-raises SIGTERM
        assert "Traceback" not in child.proto.text, child.proto.text
    finally:
        await child.kill()
        await defer.maybeDeferred(port.stopListening)


# -- socket activation ------------------------------------------------------------


@needs_activate
@pytest_twisted.ensureDeferred
async def test_socket_activation_with_systemd_socket_activate(tmp_path):
    """As wsfiles.socket + wsfiles.service: the socket exists before twistd does.

    systemd-socket-activate binds the port, waits for the first connection,
    then execs twistd with LISTEN_FDS/LISTEN_FDNAMES; it clears the
    environment except PATH, HOME and TERM, hence -E for what twistd needs.
    """
    port, datagrams = await listen_notify(tmp_path / "notify")
    listen = free_port()
    argv = [
        shutil.which("systemd-socket-activate") or "systemd-socket-activate",
        "--fdname=wsfiles",
        "-E",
        "PYTHONUNBUFFERED=1",
        "-E",
        f"NOTIFY_SOCKET={tmp_path / 'notify'}",
        "-l",
        f"127.0.0.1:{listen}",
        *wsfiles_argv("--listen", "systemd:domain=INET:name=wsfiles", "--root", "root"),
    ]
    child = Child(argv, dict(os.environ), path=str(tmp_path))
    try:
        # The first connection starts twistd; it waits in the socket's queue meanwhile.
        # (The socket exists once systemd-socket-activate has said so.)
        await within(child.proto.wait_for(b"Listening on"))
        await round_trip(f"ws://127.0.0.1:{listen}", 3 * MiB)
        assert await within(datagrams.received.get()) == "READY=1"
        assert "(systemd:domain=INET:name=wsfiles)" in child.proto.text
        assert await child.stop() in (0, -15)
        assert await within(datagrams.received.get(), TEARDOWN_TIMEOUT) == "STOPPING=1"
        assert "Traceback" not in child.proto.text
    finally:
        await child.kill()
        await defer.maybeDeferred(port.stopListening)


@pytest_twisted.ensureDeferred
async def test_restart_keeps_the_socket_and_queued_clients_get_served(tmp_path):
    """The reason for wsfiles.socket: one listening socket outlives service restarts.

    This test plays systemd: it holds the socket and passes it to two twistds
    in turn (fd 3, LISTEN_FDS=1, LISTEN_FDNAMES=wsfiles, LISTEN_PID=the
    child's pid). wsfiles must not shut the adopted socket down when it
    stops, and a client that connects between the two is served by the second.
    """
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    url = f"ws://127.0.0.1:{listener.getsockname()[1]}"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "wsfiles"}
    argv = wsfiles_argv("--listen", "systemd:domain=INET:name=wsfiles", "--root", "root")
    script = 'LISTEN_PID=$$ exec "$@"'  # the pid twistd will have: exec keeps it
    children: list[Child] = []

    def start() -> Child:
        child = Child(
            ["/bin/sh", "-c", script, "sh", *argv],
            env,
            path=str(tmp_path),
            childFDs={0: "w", 1: "r", 2: "r", 3: listener.fileno()},
        )
        children.append(child)
        return child

    try:
        first = start()
        await within(first.proto.wait_for(b"wsfiles listening on"))
        await round_trip(url, 256 * 1024)
        assert await first.stop() in (0, -15)
        # No wsfiles now: the kernel still completes the TCP handshake and
        # queues the client, whose WebSocket handshake waits for the next one.
        queued = defer.ensureDeferred(connect(url))
        second = start()
        client = await within(queued)
        try:
            assert client.hello["client"] == "anonymous"
            assert [f["name"] for f in await within(client.list())] == ["blob.bin"]
        finally:
            await within(client.close(), TEARDOWN_TIMEOUT)
        assert await second.stop() in (0, -15)
        for child in children:
            assert "Traceback" not in child.proto.text
    finally:
        for child in children:
            await child.kill()
        listener.close()


# -- MemoryDenyWriteExecute= ------------------------------------------------------

# systemd 252 implements MemoryDenyWriteExecute=yes with this seccomp filter
# (src/shared/seccomp-util.c): mmap() with PROT_WRITE and PROT_EXEC, mprotect()
# and pkey_mprotect() adding PROT_EXEC, and shmat() with SHM_EXEC fail with EPERM.
# The helper installs the same filter, then execs its arguments.
_SYSCALLS = {  # machine: (AUDIT_ARCH, mmap, mprotect, pkey_mprotect, shmat)
    "x86_64": (0xC000003E, 9, 10, 329, 30),
    "aarch64": (0xC00000B7, 222, 226, 288, 196),
}
_MDWE = """
import ctypes, os, sys
arch, mmap_nr, mprotect_nr, pkey_nr, shmat_nr = map(int, sys.argv[1:6])
LD, JEQ, AND, RET = 0x20, 0x15, 0x54, 0x06
ALLOW, EPERM = 0x7FFF0000, 0x00050001
prog = [
    (LD, 0, 0, 4), (JEQ, 0, 14, arch),                     # 0-1: another ABI: allow
    (LD, 0, 0, 0),                                         # 2: the syscall number
    (JEQ, 3, 0, mmap_nr), (JEQ, 5, 0, mprotect_nr),        # 3-4
    (JEQ, 4, 0, pkey_nr), (JEQ, 6, 9, shmat_nr),           # 5-6
    (LD, 0, 0, 32), (AND, 0, 0, 6), (JEQ, 7, 6, 6),        # 7-9: mmap W+X
    (LD, 0, 0, 32), (AND, 0, 0, 4), (JEQ, 4, 3, 4),        # 10-12: mprotect +X
    (LD, 0, 0, 32), (AND, 0, 0, 0o100000), (JEQ, 1, 0, 0o100000),  # 13-15: SHM_EXEC
    (RET, 0, 0, ALLOW), (RET, 0, 0, EPERM),                # 16-17
]
class Filter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte),
                ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint)]
class Program(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Filter))]
filters = (Filter * len(prog))(*(Filter(*f) for f in prog))
libc = ctypes.CDLL(None, use_errno=True)
assert libc.prctl(38, 1, 0, 0, 0) == 0, "PR_SET_NO_NEW_PRIVS"
program = Program(len(prog), filters)
assert libc.prctl(22, 2, ctypes.byref(program), 0, 0) == 0, ctypes.get_errno()
os.execv(sys.argv[6], sys.argv[6:])
"""

_PROBE = """
import mmap
from autobahn.websocket.xormasker import USES_NVX
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_WRITE | mmap.PROT_EXEC)
    print("W+X allowed")
except PermissionError:
    print("W+X refused")
print("NVX", USES_NVX)
"""


def under_mdwe(*argv: str) -> list[str]:
    numbers = [str(n) for n in _SYSCALLS[platform.machine()]]
    return [sys.executable, "-c", _MDWE, *numbers, *argv]


@pytest.mark.skipif(
    platform.machine() not in _SYSCALLS, reason="syscall numbers known for x86_64, aarch64"
)
@pytest_twisted.ensureDeferred
async def test_wsfiles_and_nvx_work_under_memory_deny_write_execute(tmp_path):
    # The filter works (W+X memory is refused) and Autobahn's NVX still loads:
    # it is compiled ahead of time, plain shared objects.
    code, out, err = await run_process(under_mdwe(sys.executable, "-c", _PROBE))
    assert code == 0, err
    assert out.split("\n")[:2] == ["W+X refused", "NVX True"], out + err

    # The whole service: NVX unmasks the upload, nothing needs W+X memory.
    port, datagrams = await listen_notify(tmp_path / "notify")
    listen = free_port()
    env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify"), "PYTHONUNBUFFERED": "1"}
    argv = wsfiles_argv("--listen", f"tcp:{listen}:interface=127.0.0.1", "--root", "root")
    child = Child(under_mdwe(*argv), env, path=str(tmp_path))
    try:
        assert await within(datagrams.received.get()) == "READY=1", child.proto.text
        await round_trip(f"ws://127.0.0.1:{listen}", 3 * MiB)
        assert await child.stop() in (0, -15)
        assert "native accelerator (NVX) is off" not in child.proto.text
        assert "Traceback" not in child.proto.text and "MemoryError" not in child.proto.text
    finally:
        await child.kill()
        await defer.maybeDeferred(port.stopListening)


# -- the unit files -------------------------------------------------------------


@pytest.fixture
def units(tmp_path) -> Path:
    """The units, with ExecStart= pointing at this environment's twistd (or
    wsfiles, for the sync's user unit).

    ``verify`` checks that the ExecStart= binary exists; /usr/local/bin/ is
    where docs/deploy.md links them, which need not exist here.
    """
    folder = tmp_path / "units"
    folder.mkdir()
    for unit in UNITS.iterdir():
        text = unit.read_text()
        if unit.suffix == ".service":
            program = "wsfiles" if unit.name.startswith("wsfiles-sync@") else "twistd"
            assert f"ExecStart=/usr/local/bin/{program} " in text
            text = text.replace(f"/usr/local/bin/{program}", str(BIN / program))
        (folder / unit.name).write_text(text)
    return folder


async def verify(*paths: Path, user: bool = False) -> tuple[int, list[str]]:
    """``systemd-analyze verify``: its exit code and the lines about these units
    (``user``: as a user manager would load them).

    verify also loads the units these refer to (sockets.target,
    multi-user.target, ...) from the host; a broken or missing host unit is
    reported under its own name, which is not ours to judge: lines that do
    not name one of our units are dropped.
    """
    argv = [shutil.which("systemd-analyze") or "systemd-analyze", "verify", "--man=no"]
    env = None
    if user:  # a user manager's paths need a runtime directory; a private one
        runtime = paths[0].parent / "runtime"
        runtime.mkdir(mode=0o700, exist_ok=True)
        argv.insert(1, "--user")
        env = {"XDG_RUNTIME_DIR": str(runtime)}
    code, out, err = await run_process([*argv, *map(str, paths)], cwd=paths[0].parent, env=env)
    ours = [p.name for p in paths]
    lines = [line for line in (out + err).splitlines() if any(n in line for n in ours)]
    return code, lines


@needs_analyze
@pytest.mark.parametrize(
    "names",
    [
        ["wsfiles.socket", "wsfiles.service"],
        ["wsfiles-standalone.service"],
    ],
)
@pytest_twisted.ensureDeferred
async def test_units_verify_cleanly(units, names):
    code, lines = await verify(*(units / name for name in names))
    assert (code, lines) == (0, [])


@needs_analyze
@pytest_twisted.ensureDeferred
async def test_the_sync_user_unit_verifies_as_a_user_unit(units):
    """``wsfiles sync`` runs under ``systemctl --user`` (docs/sync.md): checked
    as a template by a user manager, and naming only units a user manager has
    (it has no network-online.target, no multi-user.target)."""
    unit = units / "wsfiles-sync@.service"
    code, lines = await verify(unit, user=True)
    assert (code, lines) == (0, [])
    user_units = Path("/usr/lib/systemd/user")
    if not user_units.is_dir():
        pytest.skip("no /usr/lib/systemd/user here to check the unit's dependencies against")
    named = re.findall(r"^(?:After|Before|Wants|Requires|WantedBy)=(.+)$", unit.read_text(), re.M)
    for name in " ".join(named).split():
        assert (user_units / name).exists(), name


@needs_analyze
@pytest_twisted.ensureDeferred
async def test_verify_would_report_a_mistake(units):
    """The filter in verify() keeps what matters: a bad key in our unit is reported."""
    broken = units / "wsfiles-standalone.service"
    broken.write_text(broken.read_text().replace("[Service]\n", "[Service]\nFrobnicate=yes\n"))
    _, lines = await verify(broken)
    assert any("Frobnicate" in line for line in lines), lines


# What `systemd-analyze security --offline=yes` (systemd 252) still marks as
# exposed, each on purpose:
ACCEPTED_EXPOSURE = {
    # wsfiles serves the network: it needs AF_INET/AF_INET6 and the host's
    # network (PrivateNetwork= would cut off --listen tcp: and --metrics-listen)...
    "RestrictAddressFamilies=~AF_(INET|INET6)",  # 0.3
    "PrivateNetwork=",  # 0.5
    # ...from clients anywhere, so no IP allow list (add one in a drop-in when
    # only nginx on localhost talks to it, see docs/deploy.md).
    "IPAddressDeny=",  # 0.2
    # sd_notify is an AF_UNIX datagram.
    "RestrictAddressFamilies=~AF_UNIX",  # 0.1
    # It runs from /opt/wsfiles on the host's (read-only) root, not an image.
    "RootDirectory=/RootImage=",  # 0.1
    # ProtectClock= itself adds a read-only rtc to the device ACL.
    "DeviceAllow=",  # 0.1
}
# Measured: 1.1 ("OK") for both services, the sum of the above. The threshold
# sits one step (0.1, the score's resolution) above it: the score is coarse,
# and most single settings weigh 0.1 or less (several are implied by
# DynamicUser=), so the exact list above is the sharp check; the threshold
# catches large losses (CapabilityBoundingSet= or SystemCallFilter= gone:
# 2.6-2.8) and keeps the units well inside "OK" (< 2.0 in systemd's scale).
MAX_EXPOSURE = 1.2


@needs_analyze
@pytest.mark.parametrize("name", SERVICES)
@pytest_twisted.ensureDeferred
async def test_security_exposure_is_low(units, name):
    analyze = shutil.which("systemd-analyze") or "systemd-analyze"
    argv = [analyze, "security", "--offline=yes", str(units / name)]
    code, out, err = await run_process(argv, cwd=units)
    assert code == 0, err
    found = re.search(rf"Overall exposure level for {re.escape(name)}: ([0-9.]+)", out)
    assert found, out + err
    score = float(found.group(1))

    code, out, err = await run_process([*argv[:3], "--json=short", argv[3]], cwd=units)
    assert code == 0, err
    exposed = {check["name"] for check in json.loads(out) if check["set"] is False}
    assert exposed <= ACCEPTED_EXPOSURE, f"newly exposed: {exposed - ACCEPTED_EXPOSURE}"
    assert score <= MAX_EXPOSURE, f"{name}: exposure {score}\n{out}"
