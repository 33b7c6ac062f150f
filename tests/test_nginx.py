"""wsfiles behind nginx, configured with exactly the blocks docs/deploy.md gives.

The two marked blocks are cut out of the markdown and put, unchanged but for
the upstream's address and the access log's folder, into a minimal nginx.conf
whose every path is in tmp_path; nginx (Debian's, from the README's test
command) runs in the foreground in front of a real twistd.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import signal
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from cluster import free_port
from conftest import TEARDOWN_TIMEOUT, ChildOutput, handshake_status, http_get
from twisted.internet import defer, endpoints, protocol, reactor, task
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectError

from wsfiles.client import connect

NGINX = Path("/usr/sbin/nginx")
DEPLOY = Path(__file__).resolve().parent.parent / "docs" / "deploy.md"
UPSTREAM_IN_DOCS = "server 127.0.0.1:8080;"
TIMEOUT = 30.0
MiB = 1024 * 1024

pytestmark = pytest.mark.skipif(
    not NGINX.exists(),
    reason="/usr/sbin/nginx is missing (Debian: apt-get install nginx, see the README)",
)


def within(awaitable: Any, seconds: float = TIMEOUT) -> Deferred:
    return defer.ensureDeferred(awaitable).addTimeout(seconds, reactor)


def block(name: str) -> str:
    """The text between ``# BEGIN name`` and ``# END name`` in docs/deploy.md."""
    pattern = rf"^[ \t]*# BEGIN {re.escape(name)}[ \t]*\n(.*?)^[ \t]*# END {re.escape(name)}[ \t]*$"
    found = re.findall(pattern, DEPLOY.read_text(), re.MULTILINE | re.DOTALL)
    assert len(found) == 1, f"docs/deploy.md must hold exactly one {name} block"
    return found[0]


def test_the_documented_blocks_have_what_websockets_need():
    http, server = block("wsfiles-nginx-http"), block("wsfiles-nginx")
    assert http.count(UPSTREAM_IN_DOCS) == 1
    assert "map $http_upgrade $connection_upgrade" in http
    for directive in (
        "proxy_http_version 1.1;",
        "proxy_set_header Upgrade $http_upgrade;",
        "proxy_set_header Connection $connection_upgrade;",
        "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;",
        "proxy_request_buffering off;",
        "proxy_buffering off;",
    ):
        assert directive in server, directive
    # Well above --idle-timeout (600 s) and --ping-interval (30 s).
    for timeout in ("proxy_read_timeout", "proxy_send_timeout"):
        seconds = re.search(rf"{timeout} (\d+)s;", server)
        assert seconds and int(seconds.group(1)) > 600, timeout


def nginx_conf(prefix: Path, listen: int, upstream: str) -> str:
    http = block("wsfiles-nginx-http").replace(UPSTREAM_IN_DOCS, f"server {upstream};")
    # As root, workers would run as "nobody", who cannot enter tmp_path.
    user = "user root;\n" if os.geteuid() == 0 else ""
    return f"""{user}worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log notice;
events {{ worker_connections 64; }}
http {{
    access_log {prefix}/access.log;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
{http}
    server {{
        listen 127.0.0.1:{listen};
{block("wsfiles-nginx").replace("/var/log/nginx/", f"{prefix}/")}
    }}
}}
"""


async def until_accepting(port: int, nginx: ChildOutput, prefix: Path) -> None:
    """Until nginx accepts connections on ``port``; every try fails fast (refused)."""
    endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=1)
    while True:
        if nginx.exit_code is not None:
            log = (prefix / "error.log").read_text() if (prefix / "error.log").exists() else ""
            raise AssertionError(f"nginx exited:\n{nginx.output.decode()}\n{log}")
        try:
            peer = await endpoints.connectProtocol(endpoint, protocol.Protocol())
        except ConnectError:
            await task.deferLater(reactor, 0.05, lambda: None)
            continue
        peer.transport.abortConnection()
        return


@pytest_twisted.ensureDeferred
async def test_transfers_through_nginx(twistd_factory, tmp_path):
    srv = await twistd_factory()
    upstream = srv.url.split("://", 1)[1]
    prefix = tmp_path / "nginx"
    prefix.mkdir()
    port = free_port()
    conf = prefix / "nginx.conf"
    conf.write_text(nginx_conf(prefix, port, upstream))

    nginx = ChildOutput()
    argv = [str(NGINX), "-p", f"{prefix}/", "-c", str(conf), "-e", str(prefix / "error.log")]
    argv += ["-g", "daemon off;"]
    process = reactor.spawnProcess(nginx, argv[0], argv, env=dict(os.environ), path=str(prefix))
    try:
        await within(until_accepting(port, nginx, prefix), 10)
        url = f"ws://127.0.0.1:{port}"

        # Both channels through nginx: /command, then the /file the server offers.
        data = os.urandom(5 * MiB)
        client = await within(connect(url))
        try:
            ack = await within(client.upload("five.bin", data))
            sink = io.BytesIO()
            sent = await within(client.download("five.bin", sink))
        finally:
            await within(client.close(), TEARDOWN_TIMEOUT)
        digest = hashlib.sha256(data).hexdigest()
        assert ack["sha256"] == sent["sha256"] == digest
        assert hashlib.sha256(sink.getvalue()).hexdigest() == digest
        assert (srv.root / "five.bin").stat().st_size == 5 * MiB

        # The page and /healthz pass; /metrics does not.
        code, body = await within(http_get(f"http://127.0.0.1:{port}/healthz"))
        assert code == 200 and json.loads(body)["status"] == "ok"
        code, body = await within(http_get(f"http://127.0.0.1:{port}/"))
        assert code == 200 and b"<html" in body.lower()
        code, _ = await within(http_get(f"http://127.0.0.1:{port}/metrics"))
        assert code == 404

        # A browser on the page's own origin gets through (Host carries the
        # port it used); a foreign page does not.
        own = {"Origin": [f"http://127.0.0.1:{port}"]}
        assert await within(handshake_status(url, "/command", own)) == 101
        foreign = {"Origin": ["http://evil.example"]}
        assert await within(handshake_status(url, "/command", foreign)) == 403

        # The documented access log: every request, no query strings (tickets).
        log = (prefix / "wsfiles.access.log").read_text()
        assert '"GET /command HTTP/1.1" 101' in log and '"GET /file HTTP/1.1" 101' in log
        assert "ticket" not in log and "?" not in log
    finally:
        if nginx.exit_code is None:
            process.signalProcess(signal.SIGQUIT)  # graceful: finish what runs, then exit
            try:
                await within(nginx.ended(), TEARDOWN_TIMEOUT)
            finally:
                if nginx.exit_code is None:  # never leave nginx behind
                    process.signalProcess(signal.SIGKILL)
                    await within(nginx.ended(), TEARDOWN_TIMEOUT)
    assert nginx.exit_code == 0, nginx.output.decode()
