"""docs/protocol.md is enough to write a client: the Node.js example proves it."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
import pytest_twisted
from conftest import run_process
from test_cli_folders import older_server as older_server  # a fixture, reused

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "node"
NODE = shutil.which("node")
MiB = 1024 * 1024

pytestmark = [
    pytest.mark.skipif(NODE is None, reason="node is not installed"),
    pytest.mark.skipif(
        not (EXAMPLE / "node_modules" / "ws").exists(),
        reason="run 'npm ci --prefix examples/node' (the README's test command does)",
    ),
]


async def node(*args: str) -> tuple[int, str, str]:
    return await run_process([NODE, str(EXAMPLE / "wsfiles-client.js"), *args])


@pytest_twisted.ensureDeferred
async def test_node_client_lists_uploads_and_downloads(twistd_factory, tmp_path):
    srv = await twistd_factory()
    data = os.urandom(3 * 1024 * 1024)
    source = tmp_path / "from-node.bin"
    source.write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()

    code, out, err = await node(srv.url, "put", str(source))
    assert code == 0, err
    assert out.strip() == digest
    assert (srv.root / "from-node.bin").read_bytes() == data

    code, out, err = await node(srv.url, "ls")
    assert code == 0, err
    assert out.splitlines() == [f"{len(data)}\tfrom-node.bin"]

    code, out, err = await node(srv.url, "get", "from-node.bin", str(tmp_path / "back.bin"))
    assert code == 0, err
    assert (tmp_path / "back.bin").read_bytes() == data

    code, _, err = await node(srv.url, "get", "missing", str(tmp_path / "x"))
    assert code == 1 and err.startswith("error not_found")


def test_node_client_says_how_to_use_it():
    import subprocess

    result = subprocess.run(
        [NODE, str(EXAMPLE / "wsfiles-client.js"), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and result.stderr == ""
    assert result.stdout.startswith("usage: wsfiles-client.js URL [--token T] COMMAND")
    for command in ("ls [FOLDER]", "mkdir [-p] FOLDER", "put PATH [NAME]", "get NAME OUTPUT"):
        assert command in result.stdout


@pytest_twisted.ensureDeferred
async def test_node_client_on_a_server_without_folders(older_server, tmp_path):
    srv, url = older_server  # the same twistd, seen as a 1.1 server
    (srv.root / "a.txt").write_bytes(b"alpha")
    source = tmp_path / "x.bin"
    source.write_bytes(b"x")

    code, out, err = await node(url, "ls")
    assert (code, out, err) == (0, "5\ta.txt\n", "")
    code, out, err = await node(url, "put", str(source), "plain.bin")  # plain names: as before
    assert code == 0 and (srv.root / "plain.bin").read_bytes() == b"x", err
    for args in (
        ["ls", "docs"],
        ["mkdir", "-p", "docs/2026"],
        ["put", str(source), "docs/x.bin"],
        ["get", "docs/x.bin", str(tmp_path / "back")],
    ):
        code, out, err = await node(url, *args)
        assert (code, out, err) == (
            1,
            "",
            "error not_supported: this server does not support folders (protocol 1.2)\n",
        ), args
    assert not (srv.root / "docs").exists() and not (tmp_path / "back").exists()


@pytest_twisted.ensureDeferred
async def test_node_client_does_folders(twistd_factory, tmp_path):
    srv = await twistd_factory()
    data = os.urandom(2 * MiB + 3)
    source = tmp_path / "x.bin"
    source.write_bytes(data)

    assert await node(srv.url, "mkdir", "-p", "photos/2026") == (0, "photos/2026\n", "")
    code, out, err = await node(srv.url, "put", str(source), "photos/2026/x.bin")
    assert code == 0, err
    assert (srv.root / "photos" / "2026" / "x.bin").read_bytes() == data
    code, out, err = await node(srv.url, "put", str(source), "new/deep/y.bin")  # parents made
    assert code == 0 and (srv.root / "new" / "deep" / "y.bin").read_bytes() == data, err

    assert await node(srv.url, "ls") == (0, "-\tnew/\n-\tphotos/\n", "")
    assert await node(srv.url, "ls", "photos") == (0, "-\t2026/\n", "")
    assert await node(srv.url, "ls", "photos/2026/") == (0, f"{len(data)}\tx.bin\n", "")
    code, out, err = await node(srv.url, "get", "photos/2026/x.bin", str(tmp_path / "back"))
    assert code == 0 and (tmp_path / "back").read_bytes() == data, err

    code, out, err = await node(srv.url, "get", "photos", str(tmp_path / "dir"))
    assert code == 1 and err.startswith("error is_a_folder"), err
    code, out, err = await node(srv.url, "mkdir", "photos/2026")
    assert code == 1 and err.startswith("error exists"), err
    code, out, err = await node(srv.url, "ls", "photos/2026/x.bin")
    assert code == 1 and err.startswith("error not_a_folder"), err

    many = srv.root / "many"  # more than one page (max_list 1000): the cursor is followed
    many.mkdir()
    for i in range(1500):
        (many / f"n{i:04d}").write_bytes(b"")
    code, out, err = await node(srv.url, "ls", "many")
    assert code == 0, err
    assert out.splitlines() == [f"0\tn{i:04d}" for i in range(1500)]
