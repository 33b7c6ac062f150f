"""docs/protocol.md is enough to write a client: the Node.js example proves it."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
import pytest_twisted
from conftest import run_process

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "node"
NODE = shutil.which("node")

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
