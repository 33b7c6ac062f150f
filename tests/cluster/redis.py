"""Debian's ``redis-server`` as a child process on loopback, for tests."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

REDIS_SERVER = shutil.which("redis-server") or "redis-server"


class RedisServer:
    """``redis-server`` as a child process, stopped by its PID; restartable on its port."""

    def __init__(self, folder: Path, port: int) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.port = port
        self.pidfile = folder / "redis.pid"
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> None:
        argv = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        argv += ["--appendonly", "no", "--pidfile", str(self.pidfile), "--daemonize", "no"]
        with open(self.folder / "redis.log", "ab") as log:
            self.process = subprocess.Popen(
                argv, cwd=self.folder, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 10
        while not self._answers_ping():  # bounded polling of an outside process
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                log_text = (self.folder / "redis.log").read_text(errors="replace")
                raise RuntimeError(f"redis-server did not come up:\n{log_text}")
            time.sleep(0.02)

    def _answers_ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.process is None:
            return
        pid = self.process.pid
        with contextlib.suppress(OSError, ValueError):
            pid = int(self.pidfile.read_text().strip())
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None
