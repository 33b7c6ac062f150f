"""The web page at ``/``, driven in Debian's Chromium by Playwright.

The server is a real ``twistd wsfiles`` subprocess (Playwright's sync API
blocks, so it cannot share this process's reactor).
"""

from __future__ import annotations

import os
import select
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import BIN, add_user_with_cli, twistd_args

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

pytestmark = pytest.mark.skipif(
    not os.path.exists(CHROMIUM), reason="Debian's chromium is not installed"
)


class WebServer:
    def __init__(self, root: Path, *args: str) -> None:
        self.root = root
        argv = twistd_args("--listen", "tcp:0:interface=127.0.0.1", "--root", str(root), *args)
        self.process = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=root.parent
        )
        self.output = b""
        deadline = time.monotonic() + 30
        while b"wsfiles listening on " not in self.output:
            remaining = deadline - time.monotonic()
            assert remaining > 0, self.output.decode()
            ready, _, _ = select.select([self.process.stdout], [], [], remaining)
            if ready:
                chunk = os.read(self.process.stdout.fileno(), 65536)
                assert chunk, self.output.decode()
                self.output += chunk
        host_port = self.output.split(b"wsfiles listening on ", 1)[1].split(b" ", 1)[0]
        self.url = f"http://{host_port.decode()}"
        self.ws_url = f"ws://{host_port.decode()}"

    def stop(self) -> str:
        """Stop the server (once); return everything it logged."""
        if self.process.returncode is None:
            self.process.terminate()
            rest, _ = self.process.communicate(timeout=30)
            self.output += rest
        return self.output.decode(errors="replace")


@pytest.fixture
def web(tmp_path) -> Iterator:
    servers: list[WebServer] = []

    def start(*args: str) -> WebServer:
        root = tmp_path / f"root{len(servers)}"
        root.mkdir()
        servers.append(WebServer(root, *args))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(accept_downloads=True)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.set_default_timeout(15_000)
    yield page
    context.close()
    assert errors == []


def row(page, name: str):
    return page.locator(f"#files tbody tr[data-name='{name}']")


def test_a_file_larger_than_a_piece_downloads_in_pieces_byte_for_byte(web, page, tmp_path):
    """The page fetches big files in 8 MiB pieces (protocol 1.1 pieces) and
    saves them as one file."""
    srv = web()
    data = os.urandom(2 * 8 * 1024 * 1024 + 12_345)  # three pieces, the last short
    (srv.root / "big.bin").write_bytes(data)
    requests: list[dict] = []

    def seen(ws: Any) -> None:
        ws.on("framesent", lambda payload: requests.append(_json_or_none(payload)))

    page.on("websocket", seen)
    page.goto(srv.url)
    row(page, "big.bin").wait_for()
    with page.expect_download(timeout=60_000) as download:
        row(page, "big.bin").locator("button[data-action='download']").click()
    saved = tmp_path / "saved.bin"
    download.value.save_as(saved)
    assert saved.read_bytes() == data
    gets = [r for r in requests if r and r.get("op") == "get"]
    assert [(r["offset"], r["length"]) for r in gets] == [
        (0, 8 * 1024 * 1024),
        (8 * 1024 * 1024, 8 * 1024 * 1024),
        (16 * 1024 * 1024, 8 * 1024 * 1024),
    ]


def test_without_a_private_file_system_the_pieces_stay_blobs_and_the_file_is_whole(
    web, page, tmp_path
):
    """Outside a secure context there is no origin-private file system: the page
    then keeps the pieces as Blobs and saves them as one file."""
    srv = web()
    data = os.urandom(8 * 1024 * 1024 + 4321)  # two pieces
    (srv.root / "big.bin").write_bytes(data)
    page.add_init_script(
        "Object.defineProperty(navigator.storage, 'getDirectory', {value: undefined})"
    )
    page.goto(srv.url)
    row(page, "big.bin").wait_for()
    assert page.evaluate("() => navigator.storage.getDirectory") is None
    with page.expect_download(timeout=60_000) as download:
        row(page, "big.bin").locator("button[data-action='download']").click()
    saved = tmp_path / "saved.bin"
    download.value.save_as(saved)
    assert saved.read_bytes() == data


def _json_or_none(payload: Any) -> dict | None:
    import json

    try:
        value = json.loads(payload)
    except (TypeError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def test_list_upload_download_and_live_updates(web, page, tmp_path):
    srv = web()
    (srv.root / "hello.txt").write_bytes(b"hello")
    page.goto(srv.url)
    row(page, "hello.txt").wait_for()
    assert "5 B" in row(page, "hello.txt").inner_text()

    # Upload through the file input.
    picked = tmp_path / "picked.bin"
    picked.write_bytes(os.urandom(700_000))
    page.set_input_files("#picker", str(picked))
    row(page, "picked.bin").wait_for()
    assert (srv.root / "picked.bin").read_bytes() == picked.read_bytes()

    # Upload through a (synthetic) drop of two files.
    page.evaluate(
        """() => {
            const transfer = new DataTransfer();
            const big = new Uint8Array(600000).map((_, i) => i % 251);
            transfer.items.add(new File([big], "dropped.bin"));
            transfer.items.add(new File(["second"], "second.txt"));
            document.querySelector("#drop").dispatchEvent(
                new DragEvent("drop", {dataTransfer: transfer, bubbles: true, cancelable: true}));
        }"""
    )
    row(page, "dropped.bin").wait_for()
    row(page, "second.txt").wait_for()
    assert (srv.root / "dropped.bin").read_bytes() == bytes(i % 251 for i in range(600_000))
    assert (srv.root / "second.txt").read_bytes() == b"second"

    # Download: the browser saves the file under its name, byte for byte.
    with page.expect_download() as download:
        row(page, "picked.bin").locator("button[data-action='download']").click()
    assert download.value.suggested_filename == "picked.bin"
    saved = tmp_path / "saved.bin"
    download.value.save_as(saved)
    assert saved.read_bytes() == picked.read_bytes()

    # Another client uploads: the page updates by itself.
    other = tmp_path / "from-cli.txt"
    other.write_bytes(b"from the command line")
    subprocess.run([str(BIN / "wsfiles"), "put", srv.ws_url, str(other)], check=True, timeout=60)
    row(page, "from-cli.txt").wait_for()

    # Rename and delete.
    page.once("dialog", lambda dialog: dialog.accept("renamed.txt"))
    row(page, "second.txt").locator("button[data-action='rename']").click()
    row(page, "renamed.txt").wait_for()
    page.once("dialog", lambda dialog: dialog.accept())
    row(page, "renamed.txt").locator("button[data-action='delete']").click()
    row(page, "renamed.txt").wait_for(state="detached")
    assert not (srv.root / "renamed.txt").exists()
    page.screenshot(path=str(tmp_path / "page.png"), full_page=True)


def test_a_file_over_max_size_is_refused_in_the_page(web, page, tmp_path):
    srv = web("--max-size", "1K")
    page.goto(srv.url)
    page.locator("#status.ok").wait_for()
    big = tmp_path / "big.bin"
    big.write_bytes(b"x" * 2048)
    page.set_input_files("#picker", str(big))
    error = page.locator("#messages .error")
    error.wait_for()
    assert "larger than the server accepts" in error.inner_text()
    assert "save 'big.bin'" not in srv.stop()  # no save was even asked for
    assert not (srv.root / "big.bin").exists()
    assert not any((srv.root / ".wsfiles-partial").glob("*/*"))


def test_token_login_wrong_then_right(web, page, tmp_path):
    users = tmp_path / "users"
    token = add_user_with_cli(users, "alice")
    srv = web("--users", str(users))
    page.goto(srv.url)
    page.locator("#login-form").wait_for()
    page.fill("#token", token + "0")
    page.click("#login-form button")
    page.locator("#messages .error").wait_for()
    assert page.locator("#app").is_hidden()
    page.fill("#token", token)
    page.click("#login-form button")
    page.locator("#status.ok").wait_for()
    assert page.locator("#who").inner_text() == "alice"
    assert page.locator("#login").is_hidden()


def test_an_upload_cut_mid_way_resumes_where_it_stopped(web, page, tmp_path):
    srv = web()
    page.goto(srv.url)
    page.locator("#status.ok").wait_for()
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(64 * 1024 * 1024))
    page.set_input_files("#picker", str(big))
    page.wait_for_function(
        "() => { const p = document.querySelector('#transfers progress');"
        " return p && p.value > 0.1 && p.value < 0.9; }",
        polling=10,
    )
    page.evaluate("() => connection.fileSocket.close()")  # the connection drops
    row(page, "big.bin").wait_for(timeout=60_000)
    assert (srv.root / "big.bin").read_bytes() == big.read_bytes()
    saves = [line for line in srv.stop().splitlines() if "save 'big.bin'" in line]
    assert len(saves) == 2, saves
    assert "channel_closed" in saves[0]
    assert "ok" in saves[1] and "(from offset 0)" not in saves[1]
