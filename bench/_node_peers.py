"""The Node.js peers of bench/throughput.py, driven from Python.

bench/node/ holds them (see its files' headers): ``ws-server.js``, a file
server on the npm ``ws`` library with ``bufferutil`` doing wsfiles' job
(stream, SHA-256, fsync, rename, digest in the reply; downloads with
back-pressure and their digest); ``tus-server.js``, ``@tus/server`` with
``@tus/file-store`` (a reference: no hash, no fsync); and ``client.js``, one
long-lived Node process with both clients that this module sends one JSON
request per line, so a transfer is timed without Node's start-up and the
client's CPU is that process's.

They need ``npm ci --prefix bench/node`` (docs/performance.md); without it,
or without ``node``, ``unavailable()`` says why in one line and the benchmark
skips them.
"""

from __future__ import annotations

import contextlib
import json
import queue
import re
import shutil
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
NODE_DIR = BENCH / "node"
INSTALL = "npm ci --prefix bench/node"
READY = {
    "node-ws": re.compile(r"node-ws listening on 127\.0\.0\.1:(\d+)"),
    "tus": re.compile(r"tus listening on 127\.0\.0\.1:(\d+)"),
}
SCRIPTS = {"node-ws": "ws-server.js", "tus": "tus-server.js"}
START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0


def node_binary() -> str | None:
    return shutil.which("node") or shutil.which("nodejs")


def unavailable() -> str | None:
    """Why the Node peers cannot run here (one line), or None when they can."""
    if node_binary() is None:
        return "node is not installed"
    for package in ("ws", "bufferutil", "tus-js-client"):
        if not (NODE_DIR / "node_modules" / package).is_dir():
            return f"bench/node/node_modules is missing (install it with: {INSTALL})"
    return None


def server_argv(peer: str, root: Path) -> list[str]:
    """The command line of the Node peer server ``peer`` ("node-ws" or "tus")."""
    node = node_binary()
    assert node is not None
    return [node, str(NODE_DIR / SCRIPTS[peer]), str(root)]


class NodeClient:
    """``node bench/node/client.js``: one request at a time, JSON lines both ways."""

    def __init__(self) -> None:
        self._process: subprocess.Popen[str] | None = None
        self._lines: queue.Queue[str | None] = queue.Queue()
        self.tus_problem: str | None = None
        self.node_version = ""

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    def __enter__(self) -> NodeClient:
        node = node_binary()
        assert node is not None
        self._process = subprocess.Popen(
            [node, str(NODE_DIR / "client.js")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            start_new_session=True,
        )
        threading.Thread(target=self._read, name="node-client-output", daemon=True).start()
        try:
            hello = self._answer(START_TIMEOUT)
        except BaseException:
            self.close()
            raise
        self.node_version = str(hello.get("node", "?"))
        if not hello.get("tus"):
            self.tus_problem = f"@tus/server or tus-js-client do not load: {hello.get('why')}"
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _read(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        for line in self._process.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def _answer(self, timeout: float) -> dict[str, Any]:
        """The next JSON line (other output, e.g. a Node warning, is skipped)."""
        for _ in range(1000):
            try:
                line = self._lines.get(timeout=timeout)
            except queue.Empty:
                raise TimeoutError(f"the Node client did not answer within {timeout:g} s") from None
            if line is None:
                raise RuntimeError("the Node client exited")
            if line.startswith("{"):
                answer: dict[str, Any] = json.loads(line)
                return answer
        raise RuntimeError("the Node client printed too much that was not JSON")

    def request(self, timeout: float, **request: object) -> dict[str, Any]:
        """Send one request; return its answer, or raise RuntimeError with the client's error."""
        assert self._process is not None and self._process.stdin is not None
        self._process.stdin.write(json.dumps(request) + "\n")
        self._process.stdin.flush()
        answer = self._answer(timeout)
        if not answer.get("ok"):
            raise RuntimeError(f"Node client, {request.get('op')}: {answer.get('error')}")
        return answer

    def close(self) -> None:
        process = self._process
        if process is None:
            return
        if process.stdin is not None and not process.stdin.closed:
            with contextlib.suppress(OSError):
                process.stdin.close()
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGKILL)
            process.wait(STOP_TIMEOUT)
        if process.stdout is not None:
            process.stdout.close()
