"""Security round 2 (issue 15): the holes found by attacking a running server.

Each test fails without its fix; docs/security.md says what each defends.
"""

from __future__ import annotations

import io
import os

import pytest
import pytest_twisted
from conftest import http_get
from e2e_helpers import within

from wsfiles.client import WsfilesError, connect


@pytest_twisted.ensureDeferred
async def test_get_of_a_named_pipe_is_refused_without_blocking_the_server(twistd_factory):
    # Opening a FIFO for reading blocks until a writer comes: on the reactor
    # thread that froze every connection, /healthz included.
    srv = await twistd_factory()
    os.mkfifo(srv.root / "pipe")
    (srv.root / "plain.txt").write_bytes(b"still served")
    client = await within(connect(srv.url))
    try:
        with pytest.raises(WsfilesError) as refused:
            await within(client.download("pipe", io.BytesIO()), 5)
        assert refused.value.code == "not_found"
        status, _ = await within(http_get(srv.url.replace("ws://", "http://") + "/healthz"), 5)
        assert status == 200
        sink = io.BytesIO()
        await within(client.download("plain.txt", sink), 5)
        assert sink.getvalue() == b"still served"
        assert "pipe" not in [f["name"] for f in await within(client.list(), 5)]
    finally:
        await client.close()
