"""The ``wsfiles`` command line, run as a subprocess against a real twistd."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import pty
import re
import signal
import struct
import sys
import termios
from pathlib import Path
from typing import Any

import pytest_twisted
from conftest import BIN, TEARDOWN_TIMEOUT, ChildOutput, run_process, spawn_process
from test_hardening_b import tls_port
from test_hardening_b import tls_server_args as tls_server_args  # a fixture, reused
from twisted.internet import defer, endpoints, protocol, reactor, task
from twisted.internet.defer import Deferred

MiB = 1024 * 1024


def spawn(*args: str, env: dict | None = None, cwd: Path | None = None):
    return spawn_process([str(BIN / "wsfiles"), *args], env=env, cwd=cwd)


async def run(*args: str, **kwargs) -> tuple[int, str, str]:
    """Run the CLI without blocking the reactor (the server may be in this process)."""
    return await run_process([str(BIN / "wsfiles"), *args], **kwargs)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def one_line(err: str) -> str:
    """stderr as the CLI promises it: exactly one line and no traceback."""
    lines = err.splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest_twisted.ensureDeferred
async def test_put_ls_get_mv_rm_with_a_token(twistd_factory, tmp_path):
    users = tmp_path / "users"
    code, token, _ = await run("user", "add", "--users", str(users), "alice")
    assert code == 0
    srv = await twistd_factory("--users", str(users))
    env = {"WSFILES_TOKEN": token.strip()}
    work = tmp_path / "work"
    work.mkdir()
    (work / "a.txt").write_bytes(b"alpha")
    (work / "b.bin").write_bytes(os.urandom(3 * 1024 * 1024))

    assert (await run("put", srv.url, "a.txt", "b.bin", env=env, cwd=work))[0] == 0
    code, out, err = await run("ls", srv.url, "--json", env=env)
    assert code == 0, err
    assert [(f["name"], f["size"]) for f in json.loads(out)] == [
        ("a.txt", 5),
        ("b.bin", 3 * 1024 * 1024),
    ]
    code, out, _ = await run("ls", srv.url, env=env)
    assert "a.txt" in out and "b.bin" in out

    code, _, err = await run("get", srv.url, "b.bin", "-o", str(tmp_path / "copy"), env=env)
    assert code == 0, err
    assert sha(tmp_path / "copy") == sha(work / "b.bin")
    assert not (tmp_path / "copy.wsfiles-part").exists()

    assert (await run("mv", srv.url, "a.txt", "c.txt", env=env))[0] == 0
    code, _, err = await run("mv", srv.url, "c.txt", "b.bin", env=env)
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "exists" in err and "--overwrite" in err and '"overwrite": true' not in err
    assert (await run("rm", srv.url, "c.txt", env=env))[0] == 0
    code, _, err = await run("rm", srv.url, "c.txt", env=env)
    assert code == 1 and "not_found" in err

    # A wrong or missing token: one short line that says where a token comes from.
    for token_args in (["--token", "wrong.token"], []):
        code, _, err = await run("ls", srv.url, *token_args, env={"WSFILES_TOKEN": ""})
        assert code == 1 and len(err.splitlines()) == 1 and len(err) < 100, err
        assert "401" in err and "--token" in err and "WSFILES_TOKEN" in err
    code, _, err = await run("get", srv.url, "missing", "-o", str(tmp_path / "m"), env=env)
    assert code == 1 and "not_found" in err
    assert not (tmp_path / "m").exists() and not (tmp_path / "m.wsfiles-part").exists()


async def _wait_until(condition, what: str) -> None:
    """Poll another process's visible state, bounded (it cannot signal us)."""
    for _ in range(1000):
        if condition():
            return
        await task.deferLater(reactor, 0.01, lambda: None)
    raise AssertionError(f"timed out waiting for {what}")


@pytest_twisted.ensureDeferred
async def test_an_interrupted_put_and_get_resume(twistd_factory, tmp_path):
    srv = await twistd_factory()
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(96 * 1024 * 1024))
    partials = srv.root / ".wsfiles-partial" / "@anonymous"

    def partial_size() -> int:
        return sum(p.stat().st_size for p in partials.glob("*.part")) if partials.exists() else 0

    process, proto = spawn("put", srv.url, str(big), "--resume")
    await _wait_until(lambda: partial_size() > 8 * 1024 * 1024 or proto.ended.called, "a partial")
    process.signalProcess(signal.SIGKILL)
    await proto.ended.addTimeout(TEARDOWN_TIMEOUT, reactor)
    assert not (srv.root / "big.bin").exists()
    code, _, err = await run("put", srv.url, str(big), "--resume")
    assert code == 0, err
    assert sha(srv.root / "big.bin") == sha(big)
    assert "(from offset 0)" not in srv.output.split("save 'big.bin'")[-1].split("\n")[0]

    target = tmp_path / "copy.bin"
    partial = Path(str(target) + ".wsfiles-part")
    process, proto = spawn("get", srv.url, "big.bin", "-o", str(target), "--resume")
    await _wait_until(
        lambda: (
            (partial.exists() and partial.stat().st_size > 8 * 1024 * 1024) or proto.ended.called
        ),
        "a partial download",
    )
    process.signalProcess(signal.SIGKILL)
    await proto.ended.addTimeout(TEARDOWN_TIMEOUT, reactor)
    assert partial.exists() and not target.exists()
    code, _, err = await run("get", srv.url, "big.bin", "-o", str(target), "--resume")
    assert code == 0, err
    assert sha(target) == sha(big) and not partial.exists()
    last_get = srv.output.split("get 'big.bin'")[-1].split("\n")[0]
    assert "(from offset 0)" not in last_get


def test_python_m_wsfiles_runs_the_same_cli():
    import subprocess

    result = subprocess.run(
        [sys.executable, "-m", "wsfiles", "ls", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and "--json" in result.stdout


# -- what people see: sizes, URLs, messages -------------------------------------


@pytest_twisted.ensureDeferred
async def test_ls_shows_binary_sizes_and_exact_bytes_with_a_flag_and_in_json(twistd_factory):
    srv = await twistd_factory()
    sizes = {"big.bin": 3 * MiB, "half.bin": 1536, "tiny.txt": 5}
    for name, size in sizes.items():
        (srv.root / name).write_bytes(b"\0" * size)

    code, out, err = await run("ls", srv.url)
    assert code == 0, err
    shown = {line.split()[-1]: " ".join(line.split()[:2]) for line in out.splitlines()}
    assert shown == {"big.bin": "3.0 MiB", "half.bin": "1.5 KiB", "tiny.txt": "5 B"}
    for flag in ("-b", "--bytes"):
        code, out, err = await run("ls", srv.url, flag)
        assert code == 0, err
        assert {line.split()[-1]: int(line.split()[0]) for line in out.splitlines()} == sizes
    code, out, err = await run("ls", srv.url, "--json")
    assert code == 0, err
    assert {f["name"]: f["size"] for f in json.loads(out)} == sizes
    code, out, _ = await run("ls", "--help")
    assert code == 0 and "1 KiB = 1024 bytes" in out and "--bytes" in out


@pytest_twisted.ensureDeferred
async def test_http_and_https_urls_name_the_same_server(twistd_factory, tls_server_args, tmp_path):
    listen, cert_pem = tls_server_args
    srv = await twistd_factory("--listen", listen)
    tls = await tls_port(srv)
    plain = re.search(r"listening on 127\.0\.0\.1:(\d+) \(tcp:", srv.output)
    assert plain, srv.output
    (srv.root / "seen.txt").write_bytes(b"x")

    page = f"http://127.0.0.1:{plain.group(1)}"  # what the browser's address bar shows
    for url in (page, page + "/", page + "/?x=1#top"):
        code, out, err = await run("ls", url)
        assert code == 0 and "seen.txt" in out, err
    trusted = tmp_path / "trusted.pem"  # OpenSSL's default trust honours SSL_CERT_FILE
    trusted.write_bytes(cert_pem)
    code, out, err = await run(
        "ls", f"https://localhost:{tls}", env={"SSL_CERT_FILE": str(trusted)}
    )
    assert code == 0 and "seen.txt" in out, err


@pytest_twisted.ensureDeferred
async def test_other_urls_are_refused_in_one_line():
    for url, says in [
        ("127.0.0.1:8080", "use ws://127.0.0.1:8080"),
        ("localhost:8080", "use ws://localhost:8080"),
        ("ftp://127.0.0.1:8080", "ws://, wss://, http:// or https://"),
        ("file:///tmp/x", "ws://, wss://, http:// or https://"),
        ("ws://127.0.0.1:99999", "port"),
        ("ws://", "no host"),
    ]:
        code, out, err = await run("ls", url)
        line = one_line(err)
        assert code == 1 and out == "", (url, err)
        assert line.startswith("wsfiles ls: bad_url: ") and says in line, line


@pytest_twisted.ensureDeferred
async def test_get_checks_the_name_and_the_output_path_before_touching_anything(
    twistd_factory, tmp_path
):
    srv = await twistd_factory()
    (srv.root / "x").write_bytes(b"data")
    code, _, err = await run("get", srv.url, "x", "-o", "/nonexistent/dir/x")
    line = one_line(err)
    assert code == 1 and "/nonexistent/dir/x" in line and ".wsfiles-part" not in line

    work = tmp_path / "work"
    (work / "etc").mkdir(parents=True)
    (work / "sub").mkdir()
    # With the server's own rule, here: no server (port 1) is needed to refuse it.
    for url in (srv.url, "ws://127.0.0.1:1"):
        for extra in ([], ["--resume"]):
            code, _, err = await run("get", url, "../etc/passwd", *extra, cwd=work / "sub")
            line = one_line(err)
            assert code == 1 and line.startswith("wsfiles get: invalid_name: "), line
            assert sorted(work.rglob("*")) == [work / "etc", work / "sub"]


@pytest_twisted.ensureDeferred
async def test_the_progress_bar_counts_in_binary_units(twistd_factory, tmp_path):
    srv = await twistd_factory()
    (srv.root / "three.bin").write_bytes(os.urandom(3 * MiB))
    master, slave = pty.openpty()  # a terminal 120 columns wide, as a person has
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    terminal = ChildOutput()
    argv = [str(BIN / "wsfiles"), "get", srv.url, "three.bin", "-o", str(tmp_path / "copy")]
    reactor.spawnProcess(
        terminal, argv[0], argv, env=dict(os.environ), usePTY=(master, slave, os.ttyname(slave))
    )
    code = await terminal.ended().addTimeout(60, reactor)
    assert code == 0, terminal.text
    last = terminal.text.replace("\r", "\n").split("\n")
    final = [line for line in last if "three.bin" in line][-1]
    assert "100%" in final and "3.0 MiB of 3.0 MiB" in final and "MiB/s" in final, final
    assert not re.search(r"\d ?[kMG]B\b", terminal.text), terminal.text


# -- Ctrl-C ---------------------------------------------------------------------


class _Back(protocol.Protocol):
    """The proxy's connection to the server: passes on ``budget`` bytes, then reads no more."""

    def __init__(self, front: _Front, budget: int) -> None:
        self.front = front
        self.budget = budget
        self.lost: Deferred = Deferred()

    def connectionMade(self) -> None:
        self.front.back = self
        self.front.transport.resumeProducing()

    def dataReceived(self, data: bytes) -> None:
        passed = data[: self.budget]
        self.budget -= len(passed)
        if passed:
            self.front.transport.write(passed)
        if self.budget <= 0:
            self.transport.pauseProducing()  # the server's sends back up: a stalled transfer

    def connectionLost(self, reason: Any) -> None:
        self.front.transport.abortConnection()
        self.lost.callback(None)


class _Front(protocol.Protocol):
    back: _Back | None = None
    budget: int | None = None

    def connectionMade(self) -> None:
        self.lost: Deferred = Deferred()
        self.transport.pauseProducing()  # until the server's side is connected
        proxy: StallingProxy = self.factory.proxy
        proxy.fronts.append(self)
        self.budget = proxy.upload_budget
        endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", proxy.server_port)
        connecting = endpoints.connectProtocol(endpoint, _Back(self, proxy.budget))
        connecting.addCallbacks(proxy.backs.append, lambda _: self.transport.abortConnection())

    def dataReceived(self, data: bytes) -> None:
        assert self.back is not None
        if self.budget is not None:  # the same, from the client to the server
            data = data[: self.budget]
            self.budget -= len(data)
            if self.budget <= 0:
                self.transport.pauseProducing()
        self.back.transport.write(data)

    def connectionLost(self, reason: Any) -> None:
        if self.back is not None:
            self.back.transport.abortConnection()
        self.lost.callback(None)


class StallingProxy:
    """A TCP proxy to a server that passes each connection's first ``budget``
    bytes from the server (and ``upload_budget`` bytes to it) and then stops:
    a transfer that halts part-way, however fast the machine, with no timing
    involved."""

    def __init__(self, server_url: str, budget: int, upload_budget: int | None = None) -> None:
        self.server_port = int(server_url.rsplit(":", 1)[1])
        self.budget = budget
        self.upload_budget = upload_budget
        self.fronts: list[_Front] = []
        self.backs: list[_Back] = []
        self.port: Any = None

    async def start(self) -> str:
        factory = protocol.Factory.forProtocol(_Front)
        factory.proxy = self
        endpoint = endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
        self.port = await endpoint.listen(factory)
        return f"ws://127.0.0.1:{self.port.getHost().port}"

    async def stop(self) -> None:
        await self.port.stopListening()
        for front in self.fronts:
            front.transport.abortConnection()
        lost = [c.lost for c in [*self.fronts, *self.backs]]
        await defer.gatherResults(lost).addTimeout(TEARDOWN_TIMEOUT, reactor)


@pytest_twisted.ensureDeferred
async def test_ctrl_c_during_get_keeps_the_part_file_and_resume_fetches_only_the_rest(
    twistd_factory, tmp_path
):
    srv = await twistd_factory()
    data = os.urandom(24 * MiB)
    (srv.root / "big.bin").write_bytes(data)
    proxy = StallingProxy(srv.url, budget=4 * MiB)
    stalling_url = await proxy.start()
    target = tmp_path / "copy.bin"
    partial = Path(f"{target}.wsfiles-part")

    def held() -> int:
        return partial.stat().st_size if partial.exists() else 0

    kept = []
    try:
        # A plain get, then a get --resume, each stopped by Ctrl-C part-way.
        for extra in ([], ["--resume"]):
            before = held()
            process, cli = spawn("get", stalling_url, "big.bin", "-o", str(target), *extra)
            await _wait_until(
                lambda before=before, cli=cli: held() >= before + 2 * MiB or cli.ended.called,
                "the part file to grow by 2 MiB",
            )
            process.signalProcess("INT")
            code = await cli.ended.addTimeout(TEARDOWN_TIMEOUT, reactor)
            line = one_line(cli.err.decode())
            assert code == 130, line
            assert line.startswith("wsfiles get: interrupted; kept ") and str(partial) in line
            assert "--resume" in line and not target.exists()
            kept.append(held())
    finally:
        await proxy.stop()
    assert 2 * MiB <= kept[0] < kept[1] < len(data)  # the second continued the first

    code, _, err = await run("get", srv.url, "big.bin", "-o", str(target), "--resume")
    assert code == 0, err
    assert target.read_bytes() == data and not partial.exists()

    def completed() -> list[str]:
        return re.findall(
            r"get 'big\.bin' by anonymous: ok, \d+ bytes \(from offset (\d+)\)", srv.output
        )

    await _wait_until(lambda: completed(), "the server's record of the download")
    assert completed() == [str(kept[1])]  # the server sent only the rest


@pytest_twisted.ensureDeferred
async def test_a_plain_get_cut_off_keeps_its_part_file_for_resume(twistd_factory, tmp_path):
    srv = await twistd_factory()
    data = os.urandom(12 * MiB)
    (srv.root / "big.bin").write_bytes(data)
    proxy = StallingProxy(srv.url, budget=4 * MiB)
    stalling_url = await proxy.start()
    target = tmp_path / "copy.bin"
    partial = Path(f"{target}.wsfiles-part")
    try:
        _, cli = spawn("get", stalling_url, "big.bin", "-o", str(target))
        await _wait_until(
            lambda: (partial.exists() and partial.stat().st_size >= 2 * MiB) or cli.ended.called,
            "a part file of 2 MiB",
        )
    finally:
        await proxy.stop()  # the connection is lost
    code = await cli.ended.addTimeout(TEARDOWN_TIMEOUT, reactor)
    line = one_line(cli.err.decode())
    assert code == 1 and line.startswith("wsfiles get: channel_closed: "), line
    assert f"kept {partial}" in line and "--resume" in line
    kept = partial.stat().st_size
    assert kept >= 2 * MiB and not target.exists()

    code, _, err = await run("get", srv.url, "big.bin", "-o", str(target), "--resume")
    assert code == 0, err
    assert target.read_bytes() == data and not partial.exists()


@pytest_twisted.ensureDeferred
async def test_ctrl_c_during_put_resume_says_so_and_resume_sends_only_the_rest(
    twistd_factory, tmp_path
):
    srv = await twistd_factory()
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(16 * MiB))
    partials = srv.root / ".wsfiles-partial" / "@anonymous"

    def received() -> int:
        return sum(p.stat().st_size for p in partials.glob("*.part")) if partials.exists() else 0

    proxy = StallingProxy(srv.url, budget=1 * MiB, upload_budget=4 * MiB)
    stalling_url = await proxy.start()
    try:
        process, cli = spawn("put", stalling_url, str(big), "--resume")
        await _wait_until(lambda: received() >= 2 * MiB or cli.ended.called, "a partial of 2 MiB")
        process.signalProcess("INT")
        code = await cli.ended.addTimeout(TEARDOWN_TIMEOUT, reactor)
    finally:
        await proxy.stop()
    line = one_line(cli.err.decode())
    assert code == 130 and line.startswith("wsfiles put: interrupted; "), line
    assert "--resume" in line and not (srv.root / "big.bin").exists()

    code, _, err = await run("put", srv.url, str(big), "--resume")
    assert code == 0, err
    assert sha(srv.root / "big.bin") == sha(big)

    def saved() -> list[str]:
        return re.findall(
            r"save 'big\.bin' by anonymous: ok, \d+ bytes \(from offset (\d+)\)", srv.output
        )

    await _wait_until(lambda: saved(), "the server's record of the upload")
    assert len(saved()) == 1 and int(saved()[0]) >= 2 * MiB, srv.output  # only the rest


_INTERRUPT_WHILE_TWISTED_LOADS = """
import os, signal, sys

class InterruptOnReactorImport:
    # Ctrl-C, as typed while the reactor module loads (most of the start-up time).
    def find_spec(self, name, path=None, target=None):
        if name == "twisted.internet.reactor":
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)
        return None

sys.meta_path.insert(0, InterruptOnReactorImport())
"""


class _Silent(protocol.Protocol):
    """Accepts a connection and never answers: a client stays in its handshake."""

    def connectionMade(self) -> None:
        self.lost: Deferred = Deferred()
        self.factory.accepted.callback(self)

    def connectionLost(self, reason: Any) -> None:
        self.lost.callback(None)


@pytest_twisted.ensureDeferred
async def test_ctrl_c_at_start_up_or_while_connecting_is_one_line_and_status_130(tmp_path):
    # While Twisted loads: a sitecustomize (the interpreter imports it before
    # the command) sends SIGINT when the reactor module is first imported.
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_INTERRUPT_WHILE_TWISTED_LOADS)
    path = os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")]))
    code, out, err = await run("ls", "ws://127.0.0.1:1", env={"PYTHONPATH": path})
    assert (code, one_line(err), out) == (130, "wsfiles: interrupted", "")

    # While connecting: the server accepted the TCP connection and says nothing.
    factory = protocol.Factory.forProtocol(_Silent)
    factory.accepted = Deferred()
    endpoint = endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
    port = await endpoint.listen(factory)
    try:
        process, cli = spawn("ls", f"ws://127.0.0.1:{port.getHost().port}")
        silent = await factory.accepted.addTimeout(30, reactor)
        process.signalProcess("INT")
        code = await cli.ended.addTimeout(TEARDOWN_TIMEOUT, reactor)
        assert (code, one_line(cli.err.decode())) == (130, "wsfiles ls: interrupted")
        await silent.lost.addTimeout(TEARDOWN_TIMEOUT, reactor)
    finally:
        await port.stopListening()
