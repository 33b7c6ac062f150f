"""The ``wsfiles`` command's folders (protocol 1.2), run as a subprocess against a real twistd.

A 1.1 server is the same twistd seen through :class:`OlderServerProxy`, which
takes ``wsfiles.v1.2`` out of every handshake's offer: the server then serves
the channel exactly as 1.1, which is what an older server does.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import struct
import termios
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import pytest_twisted
from conftest import BIN, TEARDOWN_TIMEOUT, ChildOutput, run_process
from test_cli import StallingProxy, _wait_until, spawn
from twisted.internet import defer, endpoints, protocol, reactor
from twisted.internet.defer import Deferred

from wsfiles.cli import CommandFailed
from wsfiles.cli_tree import get_tree
from wsfiles.client import COMMAND_SUBPROTOCOLS, WsfilesError, connect
from wsfiles.client_tree import list_folder

MiB = 1024 * 1024
NO_FOLDERS = "this server does not support folders (protocol 1.2)"


async def run(*args: str, **kwargs: Any) -> tuple[int, str, str]:
    """Run the CLI without blocking the reactor."""
    return await run_process([str(BIN / "wsfiles"), *args], **kwargs)


def one_line(err: str) -> str:
    """stderr as the CLI promises it: exactly one line and no traceback."""
    lines = err.splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def tree_of(folder: Path) -> dict[str, bytes | None]:
    """Every file (its bytes) and folder (None) under ``folder``, by relative path."""
    return {
        str(p.relative_to(folder)): (None if p.is_dir() else p.read_bytes())
        for p in sorted(folder.rglob("*"))
    }


# -- an older (1.1) server: the same twistd, with wsfiles.v1.2 taken out of the offer --


def _without_12(head: bytes) -> bytes:
    lines = head.split(b"\r\n")
    kept = []
    for line in lines:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"sec-websocket-protocol":
            offers = [v.strip() for v in value.split(b",") if v.strip() != b"wsfiles.v1.2"]
            if not offers:
                continue
            line = b"Sec-WebSocket-Protocol: " + b", ".join(offers)
        kept.append(line)
    return b"\r\n".join(kept)


class _ToServer(protocol.Protocol):
    def __init__(self, front: _FromClient) -> None:
        self.front = front
        self.lost: Deferred = Deferred()

    def connectionMade(self) -> None:
        self.front.back = self
        self.front.transport.resumeProducing()

    def dataReceived(self, data: bytes) -> None:
        self.front.transport.write(data)

    def connectionLost(self, reason: Any) -> None:
        self.front.transport.loseConnection()
        self.lost.callback(None)


class _FromClient(protocol.Protocol):
    back: _ToServer | None = None

    def connectionMade(self) -> None:
        self.lost: Deferred = Deferred()
        self.head = b""
        self.passing = False
        self.transport.pauseProducing()  # until the server's side is connected
        proxy: OlderServerProxy = self.factory.proxy
        proxy.fronts.append(self)
        endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", proxy.server_port)
        connecting = endpoints.connectProtocol(endpoint, _ToServer(self))
        connecting.addCallbacks(proxy.backs.append, lambda _: self.transport.abortConnection())

    def dataReceived(self, data: bytes) -> None:
        assert self.back is not None
        if not self.passing:
            self.head += data
            if b"\r\n\r\n" not in self.head:
                return
            head, _, rest = self.head.partition(b"\r\n\r\n")
            data = _without_12(head) + b"\r\n\r\n" + rest
            self.passing = True
        self.back.transport.write(data)

    def connectionLost(self, reason: Any) -> None:
        if self.back is not None:
            self.back.transport.loseConnection()
        self.lost.callback(None)


class OlderServerProxy:
    """A TCP proxy to a wsfiles server that removes ``wsfiles.v1.2`` from
    every opening handshake: through it, the server speaks protocol 1.1."""

    def __init__(self, server_url: str) -> None:
        self.server_port = int(server_url.rsplit(":", 1)[1])
        self.fronts: list[_FromClient] = []
        self.backs: list[_ToServer] = []
        self.port: Any = None

    async def start(self) -> str:
        factory = protocol.Factory.forProtocol(_FromClient)
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


@pytest_twisted.async_yield_fixture
async def older_server(twistd_factory):
    """(the twistd, the URL of the same server as a 1.1 server)."""
    srv = await twistd_factory()
    proxy = OlderServerProxy(srv.url)
    url = await proxy.start()
    yield srv, url
    await proxy.stop()


# -- against a 1.1 server --------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_11_server_keeps_working_and_folder_commands_say_it_has_no_folders(
    older_server, tmp_path
):
    srv, url = older_server
    client = await connect(url, subprotocols=COMMAND_SUBPROTOCOLS)
    try:
        assert client.subprotocol == "wsfiles.v1" and not client.folders
        assert client.hello["protocol"] == 1
    finally:
        await client.close()
    (srv.root / "a.txt").write_bytes(b"alpha")
    work = tmp_path / "work"
    local = work / "tree"
    (local / "sub").mkdir(parents=True)
    (local / "sub" / "f.txt").write_bytes(b"f")
    out_dir = work / "out"

    code, out, err = await run("ls", url)
    assert code == 0, err
    assert out.split()[-1] == "a.txt" and "/" not in out.split()[-1]
    assert (await run("mv", url, "a.txt", "b.txt"))[0] == 0  # plain names: as before
    assert sorted(p.name for p in srv.root.iterdir() if not p.name.startswith(".")) == ["b.txt"]

    for args in (
        ["ls", url, "docs"],
        ["ls", url, "-R"],
        ["mkdir", url, "docs"],
        ["mkdir", "-p", url, "docs/2026"],
        ["rmdir", url, "docs"],
        ["rmdir", "-r", url, "docs"],
        ["put", "-r", url, str(local)],
        ["put", url, str(local / "sub" / "f.txt"), "--name", "sub/f.txt"],
        ["get", "-r", url, "sub", "-o", str(out_dir)],
        ["get", url, "sub/f.txt", "-o", str(work / "f.txt")],
        ["mv", url, "b.txt", "docs/b.txt"],
        ["rm", url, "docs/b.txt"],
    ):
        code, out, err = await run(*args, cwd=work)
        assert (code, out, one_line(err)) == (1, "", f"wsfiles {args[0]}: {NO_FOLDERS}"), args
    assert sorted(p.name for p in srv.root.iterdir() if not p.name.startswith(".")) == ["b.txt"]
    assert sorted(p.name for p in work.iterdir()) == ["tree"]  # nothing written here


# -- against a 1.2 server --------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_put_r_and_get_r_copy_a_whole_tree_and_ls_shows_it(twistd_factory, tmp_path):
    srv = await twistd_factory()
    local = tmp_path / "photos"
    (local / "2026" / "june").mkdir(parents=True)
    (local / "empty").mkdir()
    (local / "2026" / "june" / "big.bin").write_bytes(os.urandom(3 * MiB + 7))
    (local / "2026" / "notes.txt").write_bytes(b"notes")
    (local / "zero").write_bytes(b"")
    (local / "été.txt").write_bytes("é".encode())

    code, out, err = await run("put", "-r", srv.url, str(local), "backup/photos")
    assert (code, out, err) == (0, "", "")
    assert tree_of(srv.root / "backup" / "photos") == tree_of(local)  # real folders on disk

    code, out, err = await run("ls", srv.url)
    assert code == 0, err
    assert out.splitlines()[0].split() == ["-", *out.splitlines()[0].split()[1:3], "backup/"]
    code, out, err = await run("ls", srv.url, "backup/photos/", "-R")
    assert code == 0, err
    names = [line.split("  ")[-1] for line in out.splitlines()]
    assert names == [
        "2026/",
        "2026/june/",
        "2026/june/big.bin",
        "2026/notes.txt",
        "empty/",
        "zero",
        "été.txt",
    ]
    code, out, err = await run("ls", srv.url, "backup/photos", "--json")
    assert code == 0, err
    assert [(e["name"], e["type"], e.get("size")) for e in json.loads(out)] == [
        ("2026", "folder", None),
        ("empty", "folder", None),
        ("zero", "file", 0),
        ("été.txt", "file", 2),
    ]

    copy = tmp_path / "copy"
    code, out, err = await run("get", "-r", srv.url, "backup/photos", "-o", str(copy))
    assert (code, out, err) == (0, "", "")
    assert tree_of(copy) == tree_of(local)  # empty folder and empty file included
    code, _, err = await run("get", "-r", srv.url, "backup/photos/2026", cwd=tmp_path)
    assert code == 0, err
    assert tree_of(tmp_path / "2026") == tree_of(local / "2026")  # default: its last name

    # One file by its path, and a whole tree at the top (DEST "/").
    code, _, err = await run("get", srv.url, "backup/photos/2026/notes.txt", cwd=tmp_path)
    assert code == 0 and (tmp_path / "notes.txt").read_bytes() == b"notes", err
    code, _, err = await run("put", "-r", srv.url, str(local / "2026"), "/")
    assert code == 0, err
    assert (srv.root / "notes.txt").read_bytes() == b"notes"
    assert (srv.root / "june" / "big.bin").stat().st_size == 3 * MiB + 7


@pytest_twisted.ensureDeferred
async def test_mkdir_rmdir_mv_rm_and_their_one_line_errors(twistd_factory, tmp_path):
    srv = await twistd_factory()
    url = srv.url
    (srv.root / "f.txt").write_bytes(b"file")
    work = tmp_path / "work"
    work.mkdir()

    async def fails(*args: str) -> str:
        code, out, err = await run(*args, cwd=work)
        assert code == 1 and out == "", (args, code, err)
        return one_line(err)

    assert await run("mkdir", url, "docs") == (0, "", "")
    assert (srv.root / "docs").is_dir()
    assert (await fails("mkdir", url, "docs")).startswith("wsfiles mkdir: exists: ")
    assert (await fails("mkdir", url, "a/b")).startswith("wsfiles mkdir: not_found: ")
    assert await run("mkdir", "-p", url, "a/b/c") == (0, "", "")
    assert await run("mkdir", "-p", url, "a/b") == (0, "", "")  # an existing folder is fine
    assert (await fails("mkdir", "-p", url, "f.txt/x")).startswith("wsfiles mkdir: not_a_folder: ")
    assert (await fails("mkdir", url, "../x")).startswith("wsfiles mkdir: invalid_name: ")

    line = await fails("rmdir", url, "a")
    assert line.startswith("wsfiles rmdir: not_empty: ") and "-r" in line
    line = await fails("rmdir", url, "f.txt")
    assert line.startswith("wsfiles rmdir: not_a_folder: ") and "wsfiles rm" in line
    line = await fails("rm", url, "docs")
    assert line.startswith("wsfiles rm: is_a_folder: ") and "rmdir" in line
    assert (await fails("rmdir", url, "nothing")).startswith("wsfiles rmdir: not_found: ")

    # mv across folders: a file, then a folder; a folder never goes into itself.
    assert await run("mv", url, "f.txt", "docs/f.txt") == (0, "", "")
    assert (srv.root / "docs" / "f.txt").read_bytes() == b"file"
    assert await run("mv", url, "docs", "a/b/docs") == (0, "", "")
    assert (srv.root / "a" / "b" / "docs" / "f.txt").read_bytes() == b"file"
    line = await fails("mv", url, "a", "a/b/c/a")
    assert line.startswith("wsfiles mv: invalid_move: "), line
    (srv.root / "g.txt").write_bytes(b"g")
    line = await fails("mv", url, "g.txt", "a/b/docs/f.txt")
    assert line.startswith("wsfiles mv: exists: ") and "--overwrite" in line
    assert await run("mv", "--overwrite", url, "g.txt", "a/b/docs/f.txt") == (0, "", "")
    assert (srv.root / "a" / "b" / "docs" / "f.txt").read_bytes() == b"g"
    line = await fails("mv", "--overwrite", url, "a/b/docs/f.txt", "a/b")  # onto a folder
    assert line == (
        "wsfiles mv: exists: 'a/b' exists and --overwrite does not replace it "
        "(a folder never replaces anything and is never replaced)"
    )

    # get/ls of the wrong kind of thing.
    line = await fails("get", url, "a/b", "-o", str(work / "x"))
    assert line.startswith("wsfiles get: is_a_folder: ")
    line = await fails("get", "-r", url, "a/b/docs/f.txt", "-o", str(work / "y"))
    assert line.startswith("wsfiles get: not_a_folder: ") and "without -r" in line
    assert (await fails("ls", url, "a/b/docs/f.txt")).startswith("wsfiles ls: not_a_folder: ")
    assert (await fails("ls", url, "missing")).startswith("wsfiles ls: not_found: ")
    assert list(work.iterdir()) == []  # no output folder, no part file left

    assert await run("rmdir", "-r", url, "a") == (0, "", "")
    assert not (srv.root / "a").exists()


@pytest_twisted.ensureDeferred
async def test_ls_follows_the_pages_of_a_big_folder(twistd_factory, tmp_path):
    srv = await twistd_factory()
    big = srv.root / "big"
    big.mkdir(parents=True)
    names = [f"f{i:05d}" for i in range(2345)]  # more than two pages of max_list (1000)
    for name in names:
        (big / name).write_bytes(b"")
    code, out, err = await run("ls", srv.url, "big")
    assert code == 0, err
    assert [line.split()[-1] for line in out.splitlines()] == names
    client = await connect(srv.url, subprotocols=COMMAND_SUBPROTOCOLS)
    try:
        assert client.folders and client.hello["max_list"] < len(names)
        assert [e["name"] for e in await client.list("", recursive=True)] == [
            "big",
            *(f"big/{n}" for n in names),
        ]
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_tree_transfers_check_names_and_symlinks_before_writing(twistd_factory, tmp_path):
    srv = await twistd_factory()
    local = tmp_path / "src"
    local.mkdir()
    (local / "ok.txt").write_bytes(b"ok")
    (local / "back\\slash").write_bytes(b"x")  # a name the protocol cannot carry
    code, _, err = await run("put", "-r", srv.url, str(local))
    line = one_line(err)
    assert code == 1 and line.startswith("wsfiles put: invalid_name: ") and "back\\slash" in line
    assert not (srv.root / "src").exists()  # nothing was sent

    (local / "back\\slash").unlink()
    (local / "link").symlink_to(tmp_path)  # skipped, never followed
    os.mkfifo(local / "pipe")
    code, _, err = await run("put", "-r", srv.url, str(local))
    assert code == 0, err
    assert sorted(err.splitlines()) == [
        f"wsfiles put: skipped {local / 'link'} (a symlink or special file)",
        f"wsfiles put: skipped {local / 'pipe'} (a symlink or special file)",
    ]
    assert tree_of(srv.root / "src") == {"ok.txt": b"ok"}

    # A local symlink where the tree puts a folder is not written through.
    (srv.root / "src" / "inner").mkdir()
    (srv.root / "src" / "inner" / "secret").write_bytes(b"s")
    out_dir = tmp_path / "out"
    outside = tmp_path / "outside"
    out_dir.mkdir()
    outside.mkdir()
    (out_dir / "inner").symlink_to(outside)
    code, _, err = await run("get", "-r", srv.url, "src", "-o", str(out_dir))
    line = one_line(err)
    assert code == 1 and "symlink" in line and line.startswith("wsfiles get: "), line
    assert list(outside.iterdir()) == []


@pytest_twisted.ensureDeferred
async def test_put_r_shows_one_progress_bar_over_the_whole_tree(twistd_factory, tmp_path):
    srv = await twistd_factory()
    local = tmp_path / "tree"
    (local / "a").mkdir(parents=True)
    (local / "a" / "one.bin").write_bytes(os.urandom(2 * MiB))
    (local / "two.bin").write_bytes(os.urandom(1 * MiB))
    master, slave = pty.openpty()  # a terminal 120 columns wide, as a person has
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    terminal = ChildOutput()
    argv = [str(BIN / "wsfiles"), "put", "-r", srv.url, str(local)]
    reactor.spawnProcess(
        terminal, argv[0], argv, env=dict(os.environ), usePTY=(master, slave, os.ttyname(slave))
    )
    code = await terminal.ended().addTimeout(60, reactor)
    assert code == 0, terminal.text
    lines = [line for line in terminal.text.replace("\r", "\n").split("\n") if "tree" in line]
    assert lines and "tree (2 files)" in lines[-1], terminal.text
    assert "100%" in lines[-1] and "3.0 MiB of 3.0 MiB" in lines[-1], lines[-1]
    assert not re.search(r"of [12]\.0 MiB", terminal.text), terminal.text  # never per file
    assert tree_of(srv.root / "tree") == tree_of(local)


@pytest_twisted.ensureDeferred
async def test_ctrl_c_during_get_r_keeps_the_part_file_and_resume_completes_the_tree(
    twistd_factory, tmp_path
):
    srv = await twistd_factory()
    remote = srv.root / "docs"
    (remote / "sub").mkdir(parents=True)
    (remote / "a.txt").write_bytes(b"a" * 1000)
    (remote / "sub" / "big.bin").write_bytes(os.urandom(24 * MiB))
    proxy = StallingProxy(srv.url, budget=4 * MiB)
    stalling_url = await proxy.start()
    out_dir = tmp_path / "copy"
    partial = out_dir / "sub" / "big.bin.wsfiles-part"
    try:
        process, cli = spawn("get", "-r", stalling_url, "docs", "-o", str(out_dir))
        await _wait_until(
            lambda: (partial.exists() and partial.stat().st_size >= 2 * MiB) or cli.ended.called,
            "a part file of 2 MiB",
        )
        process.signalProcess("INT")
        code = await cli.ended.addTimeout(TEARDOWN_TIMEOUT, reactor)
    finally:
        await proxy.stop()
    line = one_line(cli.err.decode())
    assert code == 130, line
    assert line.startswith("wsfiles get: interrupted; 1 of 2 files downloaded; kept "), line
    assert str(partial) in line and "'wsfiles get -r --resume' continues it" in line
    assert (out_dir / "a.txt").read_bytes() == b"a" * 1000
    assert not (out_dir / "sub" / "big.bin").exists()

    code, _, err = await run("get", "-r", "--resume", srv.url, "docs", "-o", str(out_dir))
    assert code == 0, err
    assert tree_of(out_dir) == tree_of(remote) and not partial.exists()


@pytest.mark.every_backend
@pytest_twisted.ensureDeferred
async def test_a_tree_round_trip_on_every_backend(server_factory, backend, tmp_path):
    srv = await server_factory()
    url = srv.url
    local = tmp_path / "t"
    (local / "a" / "b").mkdir(parents=True)
    (local / "empty").mkdir()
    (local / "only-a-link").mkdir()
    (local / "only-a-link" / "l").symlink_to(tmp_path)
    (local / "a" / "b" / "deep.bin").write_bytes(os.urandom(MiB + 1))
    (local / "top.txt").write_bytes(b"top")

    code, _, err = await run("put", "-r", url, str(local), "trees/t")
    assert code == 0, err
    code, out, err = await run("ls", "-R", url, "trees")
    assert code == 0, err
    assert [line.split("  ")[-1] for line in out.splitlines()] == [
        "t/",
        "t/a/",
        "t/a/b/",
        "t/a/b/deep.bin",
        "t/empty/",
        "t/only-a-link/",
        "t/top.txt",
    ]
    assert await run("mv", url, "trees/t", "moved/t") == (0, "", "")
    copy = tmp_path / "copy"
    code, _, err = await run("get", "-r", url, "moved/t", "-o", str(copy))
    assert code == 0, err
    (local / "only-a-link" / "l").unlink()
    assert tree_of(copy) == tree_of(local)
    assert await run("rmdir", url, "trees") == (0, "", "")  # emptied by the move
    assert await run("rmdir", "-r", url, "moved") == (0, "", "")
    assert await run("ls", url) == (0, "", "")


class _ListingClient:
    """A client whose server lists what a hostile server could: ``get -r``
    must check every name before it names a local file."""

    folders = True

    def __init__(self, entries: list[dict[str, Any]]) -> None:
        self.entries = entries
        self.hello = {"features": ["folders"]}
        self.subprotocol = "wsfiles.v1.2"
        self.downloads: list[str] = []

    async def list(self, path: str = "", recursive: bool = False) -> list[dict[str, Any]]:
        return self.entries

    async def download(self, name: str, sink: Any, **kwargs: Any) -> dict[str, Any]:
        self.downloads.append(name)
        return {}


@pytest.mark.parametrize(
    "bad", ["../escape", "/etc/passwd", "a/../../b", "a//b", "a\\b", "x\x1b[2J", ".wsfiles-tmp/x"]
)
@pytest_twisted.ensureDeferred
async def test_get_r_refuses_a_listing_that_names_files_outside_its_folder(tmp_path, bad):
    client = _ListingClient(
        [
            {"name": "fine", "type": "file", "size": 0, "mtime": 0},
            {"name": bad, "type": "file", "size": 1, "mtime": 0},
        ]
    )
    target = tmp_path / "out"
    args = SimpleNamespace(
        name="x", remote_folder="x", local_dir=str(target), quiet=True, resume=False
    )
    with pytest.raises(CommandFailed, match="bad_reply: the server listed an unusable name"):
        await get_tree(client, args)
    assert client.downloads == [] and not target.exists() and sorted(tmp_path.iterdir()) == []


class _PagingClient:
    """A 1.2 channel whose server answers ``list`` with the given pages, in turn."""

    def __init__(self, pages: list[dict[str, Any]]) -> None:
        self.pages = pages
        self.hello = {"features": ["folders"]}
        self.subprotocol = "wsfiles.v1.2"
        self.asked: list[dict[str, Any]] = []

    async def request(self, message: dict[str, Any]) -> dict[str, Any]:
        self.asked.append(message)
        return self.pages[min(len(self.asked), len(self.pages)) - 1]


def _entry(name: str) -> dict[str, Any]:
    return {"name": name, "type": "file", "size": 0, "mtime": 0}


@pytest_twisted.ensureDeferred
async def test_list_follows_cursors_to_the_last_page_and_stops_on_pages_that_never_end():
    client = _PagingClient(
        [
            {"op": "list", "files": [_entry("a"), _entry("b")], "cursor": "c1"},
            {"op": "list", "files": [_entry("c")], "cursor": "c2"},
            {"op": "list", "files": [_entry("d")]},
        ]
    )
    entries = await list_folder(client, "docs", recursive=True)  # type: ignore[arg-type]
    assert [e["name"] for e in entries] == ["a", "b", "c", "d"]
    assert client.asked == [
        {"op": "list", "path": "docs", "recursive": True},
        {"op": "list", "path": "docs", "recursive": True, "cursor": "c1"},
        {"op": "list", "path": "docs", "recursive": True, "cursor": "c2"},
    ]
    for endless in (
        [{"op": "list", "files": [_entry("a")], "cursor": "same"}],  # the same cursor again
        [{"op": "list", "files": [], "cursor": "c"}],  # a page with nothing in it
    ):
        client = _PagingClient(endless)
        with pytest.raises(WsfilesError) as failure:
            await list_folder(client)  # type: ignore[arg-type]
        assert failure.value.code == "bad_reply" and len(client.asked) <= 2


@pytest_twisted.ensureDeferred
async def test_a_library_client_that_did_not_offer_12_is_told_how_to(server):
    client = await server.connect()  # connect()'s default: a 1.1 client
    assert client.subprotocol == "wsfiles.v1" and not client.folders
    for attempt in (
        lambda: client.mkdir("docs"),
        lambda: client.list("docs"),
        lambda: client.upload("docs/a.txt", b"a"),
    ):
        with pytest.raises(WsfilesError) as failure:
            await attempt()
        assert failure.value.code == "not_supported"
        assert "subprotocols=COMMAND_SUBPROTOCOLS" in failure.value.message
    assert [e["name"] for e in await client.list()] == []  # the top, as in 1.1


@pytest_twisted.ensureDeferred
async def test_changed_events_of_a_12_channel_reach_the_client_per_folder(server):
    watcher = await server.connect(subprotocols=COMMAND_SUBPROTOCOLS)
    actor = await server.connect(subprotocols=COMMAND_SUBPROTOCOLS)
    await actor.mkdir("docs")
    await actor.upload("docs/a.txt", b"a")
    seen: dict[str, list[str]] = {}
    top_lists = []
    for _ in range(10):  # bounded: the two folders' events, coalesced or not
        event = await watcher.folder_changes.get().addTimeout(10, reactor)
        seen[event["path"]] = [e["name"] for e in event["files"]]
        if seen.get("docs") == ["a.txt"] and "" in seen:
            break
    assert seen == {"": ["docs"], "docs": ["a.txt"]}
    while watcher.changes.pending:  # the top folder's lists, as 1.1 callers read them
        top_lists.append(watcher.changes.pending.pop(0))
    assert top_lists and all([e["name"] for e in files] == ["docs"] for files in top_lists)
