"""The Node peers bench/throughput.py measures wsfiles against do the job they claim.

A peer that silently stored other bytes, or hung, would make every ratio in
docs/performance.md meaningless; these drive them the way the benchmark does
(bench/_node_peers.py), with a small file.  bench/node is installed by the
README's test command (``npm ci --prefix bench/node``).
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import _node_peers as node_peers  # noqa: E402
from _common import ServerProcess  # noqa: E402

TIMEOUT = 30.0
#: Not a multiple of the peers' 128 KiB chunks, so the last one is short.
SIZE = 3 * 1024 * 1024 + 5


@pytest.fixture
def source(tmp_path: Path) -> tuple[Path, bytes]:
    data = os.urandom(SIZE)
    path = tmp_path / "source.bin"
    path.write_bytes(data)
    return path, data


@pytest.fixture
def node_client() -> Iterator[node_peers.NodeClient]:
    problem = node_peers.unavailable()
    assert problem is None, problem
    with node_peers.NodeClient() as client:
        yield client


def test_node_ws_peer_stores_durably_and_serves_the_file_with_its_digest(
    tmp_path: Path, source: tuple[Path, bytes], node_client: node_peers.NodeClient
) -> None:
    path, data = source
    root = tmp_path / "root"
    root.mkdir()
    argv = node_peers.server_argv("node-ws", root)
    with ServerProcess("node-ws", argv, node_peers.READY["node-ws"]) as server:
        assert "bufferutil yes" in server.output[-1]
        reply = node_client.request(
            TIMEOUT, op="ws-upload", port=server.port, source=str(path), name="f.bin"
        )
        assert reply == {"ok": True, "size": SIZE, "sha256": hashlib.sha256(data).hexdigest()}
        assert [p.name for p in root.iterdir()] == ["f.bin"]  # renamed into place
        assert (root / "f.bin").read_bytes() == data

        sink = tmp_path / "copy.bin"
        reply = node_client.request(
            TIMEOUT, op="ws-download", port=server.port, name="f.bin", sink=str(sink)
        )
        assert reply == {"ok": True, "size": SIZE, "sha256": hashlib.sha256(data).hexdigest()}
        assert sink.read_bytes() == data


def test_tus_peer_takes_one_upload_and_serves_it(
    tmp_path: Path, source: tuple[Path, bytes], node_client: node_peers.NodeClient
) -> None:
    assert node_client.tus_problem is None
    path, data = source
    root = tmp_path / "root"
    root.mkdir()
    argv = node_peers.server_argv("tus", root)
    with ServerProcess("tus", argv, node_peers.READY["tus"]) as server:
        reply = node_client.request(
            TIMEOUT, op="tus-upload", port=server.port, source=str(path), name="f.bin"
        )
        assert reply["url"].startswith(f"http://127.0.0.1:{server.port}/files/")
        sink = tmp_path / "copy.bin"
        node_client.request(TIMEOUT, op="tus-download", url=reply["url"], sink=str(sink))
        assert sink.read_bytes() == data
