"""The ``wsfiles`` command's folders (protocol 1.2), run as a subprocess against a real twistd.

A 1.1 server is the same twistd seen through :class:`OlderServerProxy`, which
takes ``wsfiles.v1.2`` out of every handshake's offer: the server then serves
the channel exactly as 1.1, which is what an older server does.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import pytest_twisted
from conftest import BIN, TEARDOWN_TIMEOUT, run_process
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
