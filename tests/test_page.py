"""The web page at ``/``, driven in Debian's Chromium by Playwright.

The server is a real ``twistd wsfiles`` subprocess (Playwright's sync API
blocks, so it cannot share this process's reactor). The tests wait for what a
person would see (Playwright's ``expect`` and ``wait_for``), never for a time.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import threading
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
AXE = Path(__file__).parent / "page" / "node_modules" / "axe-core" / "axe.min.js"
MiB = 1024 * 1024

pytestmark = pytest.mark.skipif(
    not os.path.exists(CHROMIUM), reason="Debian's chromium is not installed"
)


class WebServer:
    """A ``twistd wsfiles`` process; its output is read by a thread as it comes
    (a full pipe would stall the server)."""

    def __init__(self, root: Path, *args: str, listen: str = "tcp:0:interface=127.0.0.1") -> None:
        self.root = root
        self.args = args
        argv = twistd_args("--listen", listen, "--root", str(root), *args)
        self.process = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=root.parent
        )
        self._chunks: list[bytes] = []
        self._listening = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not self._listening.wait(30) or self.process.poll() is not None:
            self.process.kill()
            self.process.wait(10)
            self._reader.join(10)
            raise AssertionError("twistd did not start:\n" + self.output)
        line = self.output.split("wsfiles listening on ", 1)[1]
        self.host_port = line.split(" ", 1)[0].split("\n", 1)[0]
        self.url = f"http://{self.host_port}"
        self.ws_url = f"ws://{self.host_port}"

    def _read(self) -> None:
        assert self.process.stdout is not None
        for chunk in iter(lambda: os.read(self.process.stdout.fileno(), 65536), b""):
            self._chunks.append(chunk)
            if b"wsfiles listening on " in b"".join(self._chunks):
                self._listening.set()
        self._listening.set()  # it ended: let the waiter see why

    @property
    def output(self) -> str:
        return b"".join(self._chunks).decode(errors="replace")

    def kill(self) -> None:
        """SIGKILL: a crash, nothing flushed or closed politely."""
        self.process.kill()
        self.process.wait(30)
        self._reader.join(30)

    def restart(self) -> WebServer:
        """A new process on the same port and root (after kill())."""
        host, port = self.host_port.rsplit(":", 1)
        return WebServer(self.root, *self.args, listen=f"tcp:{port}:interface={host}")

    def stop(self) -> str:
        """Stop the server (once); return everything it logged."""
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(30)
        self._reader.join(30)
        return self.output


@pytest.fixture
def web(tmp_path) -> Iterator:
    servers: list[WebServer] = []

    def start(*args: str) -> WebServer:
        root = tmp_path / f"root{len(servers)}"
        root.mkdir()
        servers.append(WebServer(root, *args))
        return servers[-1]

    start.servers = servers  # type: ignore[attr-defined]
    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        yield browser
        browser.close()


@pytest.fixture
def context(browser):
    context = browser.new_context(accept_downloads=True)
    context.set_default_timeout(15_000)
    yield context
    context.close()


@pytest.fixture
def page(context):
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    assert errors == []


@pytest.fixture
def console(page) -> list[str]:
    """Everything the page logs to its console (errors, warnings, CSP violations)."""
    messages: list[str] = []
    page.on("console", lambda message: messages.append(f"{message.type}: {message.text}"))
    return messages


def expect(locator: Any) -> Any:
    """Playwright's expect, patient enough for a loaded machine and for one
    backoff step of the page (at most 4 s) plus a reconnection."""
    from playwright.sync_api import expect as playwright_expect

    playwright_expect.set_options(timeout=15_000)
    return playwright_expect(locator)


def row(page, name: str):
    return page.locator(f"#files tbody tr[data-name={json.dumps(name)}]")


def connected(page) -> None:
    expect(page.locator("#status")).to_have_text("connected")


def log_in(page, token: str) -> None:
    """Keep ``token`` in the tab before the page loads, as a login would."""
    page.add_init_script(f"sessionStorage.setItem('wsfiles-token', {json.dumps(token)})")


def drop_files(page, files: dict[str, int]) -> None:
    """A (synthetic) drop of files made in the page: name -> size (bytes i % 251)."""
    page.evaluate(
        """(files) => {
            const transfer = new DataTransfer();
            for (const [name, size] of Object.entries(files)) {
                const data = new Uint8Array(size).map((_, i) => i % 251);
                transfer.items.add(new File([data], name));
            }
            document.querySelector("#drop").dispatchEvent(
                new DragEvent("drop", {dataTransfer: transfer, bubbles: true, cancelable: true}));
        }""",
        files,
    )


def without_download_op(page) -> None:
    """Stand in for a server older than the ``download`` op: the page's
    ``download`` commands go out under an op no server knows, so the server
    answers ``unknown_op`` and the page falls back to pieces over the WebSocket."""
    page.add_init_script(
        """(() => {
            const send = WebSocket.prototype.send;
            WebSocket.prototype.send = function (data) {
                if (typeof data !== "string") return send.call(this, data);
                return send.call(this, data.replace('{"op":"download"', '{"op":"download-1"'));
            };
        })()"""
    )


def durable_offset(root: Path, name: str, client: str = "@anonymous") -> int:
    """What the server has fsynced of a resumable upload (its partial's record)."""
    key = hashlib.sha256(name.encode()).hexdigest()
    try:
        record = json.loads((root / ".wsfiles-partial" / client / f"{key}.json").read_text())
    except (OSError, ValueError):
        return 0
    return record.get("durable", 0)


def _json_or_none(payload: Any) -> dict | None:
    try:
        value = json.loads(payload)
    except (TypeError, ValueError):
        return None
    return value if isinstance(value, dict) else None


# -- downloads in pieces (only from servers without the download op) -------------


def test_a_file_larger_than_a_piece_downloads_in_pieces_byte_for_byte(web, page, tmp_path):
    """From a server without the ``download`` op the page fetches big files in
    8 MiB pieces (protocol 1.1 pieces), each checked against its
    range_sha256, and saves them as one file."""
    srv = web()
    without_download_op(page)
    data = os.urandom(2 * 8 * MiB + 12_345)  # three pieces, the last short
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
    item = page.locator("#transfers li", has_text="big.bin")
    expect(item.locator(".stats")).to_have_text("downloaded · SHA-256 of each piece verified")
    gets = [r for r in requests if r and r.get("op") == "get"]
    assert [(r["offset"], r["length"]) for r in gets] == [
        (0, 8 * MiB),
        (8 * MiB, 8 * MiB),
        (16 * MiB, 8 * MiB),
    ]


def test_without_a_private_file_system_the_pieces_stay_blobs_and_the_file_is_whole(
    web, page, tmp_path
):
    """Outside a secure context there is no origin-private file system: the page
    then keeps the pieces as Blobs and saves them as one file."""
    srv = web()
    data = os.urandom(8 * MiB + 4321)  # two pieces
    (srv.root / "big.bin").write_bytes(data)
    without_download_op(page)
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


# -- the basics ---------------------------------------------------------------------


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
    drop_files(page, {"dropped.bin": 600_000, "second.txt": 6})
    row(page, "dropped.bin").wait_for()
    row(page, "second.txt").wait_for()
    assert (srv.root / "dropped.bin").read_bytes() == bytes(i % 251 for i in range(600_000))
    assert (srv.root / "second.txt").read_bytes() == bytes(range(6))

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


def test_a_file_over_max_size_is_refused_in_the_page(web, page, tmp_path):
    srv = web("--max-size", "1K")
    page.goto(srv.url)
    connected(page)
    big = tmp_path / "big.bin"
    big.write_bytes(b"x" * 2048)
    page.set_input_files("#picker", str(big))
    failed = page.locator("#transfers li.failed")
    expect(failed).to_contain_text("larger than the server accepts")
    expect(failed.get_by_role("button", name=re.compile("^Retry"))).to_have_count(0)  # pointless
    assert "save 'big.bin'" not in srv.stop()  # no save was even asked for
    assert not (srv.root / "big.bin").exists()
    assert not any((srv.root / ".wsfiles-partial").glob("*/*"))


# -- failures --------------------------------------------------------------------------


def test_a_failed_upload_says_why_and_offers_a_retry(web, page, tmp_path):
    """Not a full blue bar with a small "failed": the reason, a Retry button, and
    a retry that works once the cause is gone."""
    srv = web("--quota", "1M")
    (srv.root / "filler.bin").write_bytes(b"f" * 700_000)
    page.goto(srv.url)
    row(page, "filler.bin").wait_for()
    drop_files(page, {"new.bin": 500_000})
    item = page.locator("#transfers li", has_text="new.bin")
    expect(item).to_have_class("failed")
    expect(item).to_contain_text("Failed: This upload would exceed your storage quota")
    expect(item.locator("progress")).to_be_hidden()
    (srv.root / "filler.bin").unlink()  # the problem is gone...
    item.get_by_role("button", name="Retry the upload of new.bin").click()
    row(page, "new.bin").wait_for()  # ...and the retry succeeds
    assert (srv.root / "new.bin").read_bytes() == bytes(i % 251 for i in range(500_000))
    expect(item).to_have_class("done")


def test_error_banners_name_the_file_replace_each_other_and_clear(web, page):
    srv = web()
    for name in ("a.txt", "b.txt"):
        (srv.root / name).write_bytes(b"x")
    page.goto(srv.url)
    row(page, "b.txt").wait_for()
    banners = page.locator("#messages .banner")
    for _ in range(2):  # the same failure twice: one banner, not two
        page.once("dialog", lambda dialog: dialog.accept("b.txt"))
        row(page, "a.txt").get_by_role("button", name="Rename a.txt").click()
        expect(banners).to_have_text(
            re.compile("Renaming “a.txt” to “b.txt” failed: A file with that name already exists")
        )
    expect(banners).to_have_count(1)
    page.once("dialog", lambda dialog: dialog.accept("c.txt"))
    row(page, "a.txt").get_by_role("button", name="Rename a.txt").click()
    row(page, "c.txt").wait_for()
    expect(banners).to_have_count(0)  # the problem is gone


# -- reconnecting -----------------------------------------------------------------------


def test_after_a_server_crash_the_page_reconnects_and_the_upload_resumes(web, page, tmp_path):
    """A real server process is killed (SIGKILL) mid-upload and started again on
    the same port and root: the page says it is reconnecting, reconnects by
    itself, and the upload continues from the server's durable offset."""
    srv = web()
    page.goto(srv.url)
    connected(page)
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(192 * MiB))  # page uploads got faster: a wide window
    page.set_input_files("#picker", str(big))
    # Kill once the server has fsynced a checkpoint (32 MiB), so there is
    # something durable to resume from; the bounded wait is on the server's disk.
    page.wait_for_function("() => !!document.querySelector('#transfers li.active')")
    for _ in range(2000):
        if durable_offset(srv.root, "big.bin") > 0:
            break
        page.wait_for_timeout(10)
    offset = durable_offset(srv.root, "big.bin")
    assert offset > 0, "the upload ended before a checkpoint"
    srv.kill()

    expect(page.locator("#status")).to_have_text("reconnecting…")
    expect(page.locator("#connection")).to_contain_text("Trying again in")
    item = page.locator("#transfers li", has_text="big.bin")
    expect(item).to_contain_text("the upload resumes where it stopped once the page reconnects")
    assert not (srv.root / "big.bin").exists()

    again = srv.restart()
    web.servers.append(again)
    row(page, "big.bin").wait_for(timeout=60_000)
    connected(page)
    expect(page.locator("#connection")).to_be_empty()
    assert (srv.root / "big.bin").read_bytes() == big.read_bytes()
    saves = [line for line in again.stop().splitlines() if "save 'big.bin'" in line]
    assert len(saves) == 1 and ": ok," in saves[0], saves
    resumed = int(re.search(r"\(from offset (\d+)\)", saves[0]).group(1))
    assert resumed >= offset


def test_an_interrupted_download_fails_clearly_and_nothing_writes_to_a_dead_socket(
    web, page, console, tmp_path
):
    srv = web()
    without_download_op(page)  # (a download through a ticket is the browser's business)
    data = os.urandom(64 * MiB)
    (srv.root / "big.bin").write_bytes(data)
    (srv.root / "small.txt").write_bytes(b"small")
    page.goto(srv.url)
    row(page, "big.bin").locator("button[data-action='download']").click()
    page.wait_for_function(
        "() => { const p = document.querySelector('#transfers li.active progress');"
        " return p && p.value > 0 && p.value < 0.8; }",
        polling=10,
    )
    srv.kill()
    item = page.locator("#transfers li", has_text="big.bin")
    expect(item).to_have_class("failed")
    expect(item).to_contain_text("Failed: the connection was lost during the download")
    expect(page.locator("#status")).to_have_text("reconnecting…")

    # While the server is away, an action says so instead of writing to the
    # closed socket (Chromium would log "WebSocket is already in CLOSING or
    # CLOSED state") and waiting forever.
    page.once("dialog", lambda dialog: dialog.accept())
    row(page, "small.txt").locator("button[data-action='delete']").click()
    expect(page.locator("#messages .banner")).to_contain_text(
        "Deleting “small.txt” failed: not connected to the server"
    )
    assert not [m for m in console if "CLOSED state" in m]

    again = srv.restart()
    web.servers.append(again)
    connected(page)
    with page.expect_download(timeout=60_000) as download:
        item.get_by_role("button", name="Retry the download of big.bin").click()
    saved = tmp_path / "saved.bin"
    download.value.save_as(saved)
    assert saved.read_bytes() == data
    assert (srv.root / "small.txt").exists()


# -- logging in -------------------------------------------------------------------------


def test_login_explains_tokens_refuses_a_wrong_one_then_logs_in_and_out(web, page, tmp_path):
    users = tmp_path / "users"
    token = add_user_with_cli(users, "alice")
    srv = web("--users", str(users))
    page.goto(srv.url)
    login = page.locator("#login")
    expect(login).to_be_visible()
    expect(login).to_contain_text("wsfiles user add")
    expect(page.locator("#token")).to_be_focused()
    assert page.locator("#app").is_hidden()

    page.fill("#token", token + "0")
    page.keyboard.press("Enter")
    banner = page.locator("#messages .banner")
    expect(banner).to_contain_text("The server refused this token")
    expect(page.locator("#token")).to_be_focused()
    assert page.locator("#app").is_hidden()

    page.fill("#token", token)
    page.keyboard.press("Enter")
    connected(page)
    expect(page.locator("#who")).to_have_text("alice")
    expect(banner).to_have_count(0)  # the problem is gone: so is its banner
    assert page.locator("#login").is_hidden()

    page.get_by_role("button", name="Log out").click()
    expect(login).to_be_visible()
    expect(page.locator("#token")).to_be_focused()
    assert page.evaluate("() => sessionStorage.getItem('wsfiles-token')") is None
    page.reload()
    expect(login).to_be_visible()


def test_a_revoked_token_asks_for_a_new_one_instead_of_reconnecting(web, page, tmp_path):
    """The server ends the channel with 4401 when the user is removed: the page
    asks for a token, and its status says so (it is not "reconnecting")."""
    users = tmp_path / "users"
    token = add_user_with_cli(users, "alice")
    add_user_with_cli(users, "bob")
    srv = web("--users", str(users))
    log_in(page, token)
    page.goto(srv.url)
    connected(page)
    kept = [line for line in users.read_text().splitlines(True) if not line.startswith("alice ")]
    (tmp_path / "users.new").write_text("".join(kept))
    os.replace(tmp_path / "users.new", users)  # as `wsfiles user remove` would
    expect(page.locator("#login")).to_be_visible()
    expect(page.locator("#messages .banner")).to_contain_text("Your token is no longer valid")
    expect(page.locator("#status")).to_have_text("login needed")
    expect(page.locator("#token")).to_be_focused()
    assert page.evaluate("() => sessionStorage.getItem('wsfiles-token')") is None


def test_too_many_connections_is_not_a_login_and_the_page_keeps_trying(web, context, tmp_path):
    users = tmp_path / "users"
    token = add_user_with_cli(users, "alice")
    srv = web("--users", str(users), "--max-connections-per-client", "1")
    first = context.new_page()
    log_in(first, token)
    first.goto(srv.url)
    connected(first)

    second = context.new_page()
    log_in(second, token)
    second.goto(srv.url)
    expect(second.locator("#connection")).to_contain_text("Too many connections")
    expect(second.locator("#status")).to_have_text("reconnecting…")
    assert second.locator("#login").is_hidden()

    first.close()  # a slot frees up: the second page gets in by itself
    connected(second)
    expect(second.locator("#who")).to_have_text("alice")


def test_a_normal_load_logs_nothing_to_the_console(web, context, tmp_path):
    """No CSP violation (the icon), no failed tokenless WebSocket with --users."""
    logged: list[str] = []

    def watch(page: Any) -> Any:
        page.on("console", lambda message: logged.append(f"{message.type}: {message.text}"))
        return page

    plain = web()
    page = watch(context.new_page())
    page.goto(plain.url)
    connected(page)

    users = tmp_path / "users"
    token = add_user_with_cli(users, "alice")
    srv = web("--users", str(users))
    page = watch(context.new_page())
    page.goto(srv.url)
    expect(page.locator("#login")).to_be_visible()
    page.fill("#token", token)
    page.keyboard.press("Enter")
    connected(page)
    page.reload()  # the token is kept in the tab
    connected(page)
    assert "whoami" in srv.stop()  # the page asked before connecting...
    assert "refused a command channel" not in srv.output  # ...so never without a token
    assert logged == []


# -- keyboard ---------------------------------------------------------------------------


def test_every_action_works_from_the_keyboard(web, page, tmp_path):
    srv = web()
    (srv.root / "report.txt").write_bytes(b"old")
    # Playwright turns file-chooser interception on without waiting for it: a
    # listener from the start has it on before the first key press.
    page.on("filechooser", lambda chooser: None)
    page.goto(srv.url)
    row(page, "report.txt").wait_for()

    # Tab reaches the drop zone, which opens the file picker on Enter...
    for _ in range(20):
        page.keyboard.press("Tab")
        if page.evaluate("() => document.activeElement.id") == "drop":
            break
    expect(page.locator("#drop")).to_be_focused()
    new = tmp_path / "new.txt"
    new.write_bytes(b"new file")
    with page.expect_file_chooser() as chooser:
        page.keyboard.press("Enter")
    chooser.value.set_files(str(new))
    row(page, "new.txt").wait_for()

    # ...and on Space. A name that exists is not replaced without asking.
    same = tmp_path / "report.txt"
    same.write_bytes(b"new version")
    page.locator("#drop").focus()
    with page.expect_file_chooser() as chooser:
        page.keyboard.press(" ")
    chooser.value.set_files(str(same))
    question = page.locator("#transfers li.asking")
    expect(question).to_contain_text("“report.txt” already exists. Replace it?")
    expect(question.get_by_role("button", name="Replace report.txt")).to_be_focused()
    page.keyboard.press("Tab")  # to Cancel
    page.keyboard.press("Enter")
    expect(question).to_have_count(0)
    assert (srv.root / "report.txt").read_bytes() == b"old"

    page.locator("#drop").focus()
    with page.expect_file_chooser() as chooser:
        page.keyboard.press("Enter")
    chooser.value.set_files(str(same))
    expect(page.get_by_role("button", name="Replace report.txt")).to_be_focused()
    page.keyboard.press("Enter")
    expect(page.locator("#transfers li", has_text="report.txt")).to_have_class("done")
    assert (srv.root / "report.txt").read_bytes() == b"new version"

    # Download, rename and delete from their buttons, with Enter.
    page.get_by_role("button", name="Download new.txt").focus()
    with page.expect_download() as download:
        page.keyboard.press("Enter")
    saved = tmp_path / "saved.txt"
    download.value.save_as(saved)
    assert saved.read_bytes() == b"new file"
    page.once("dialog", lambda dialog: dialog.accept("newer.txt"))
    page.get_by_role("button", name="Rename new.txt").focus()
    page.keyboard.press("Enter")
    row(page, "newer.txt").wait_for()
    page.once("dialog", lambda dialog: dialog.accept())
    page.get_by_role("button", name="Delete newer.txt").focus()
    page.keyboard.press("Enter")
    row(page, "newer.txt").wait_for(state="detached")
    assert not (srv.root / "newer.txt").exists()


# -- layout and accessibility ------------------------------------------------------------------


def _fill_for_layout(srv: WebServer, page) -> tuple[str, str]:
    """Files with long names, and a failed upload of a 300-character name."""
    long_name = "L" * 250 + ".txt"  # as long as a name may be (255 bytes)
    (srv.root / long_name).write_bytes(b"x" * 123_456)
    (srv.root / "short.txt").write_bytes(b"x")
    too_long = "T" * 296 + ".bin"
    page.goto(srv.url)
    row(page, "short.txt").wait_for()
    drop_files(page, {too_long: 10})
    expect(page.locator("#transfers li.failed")).to_contain_text("not allowed")
    return long_name, too_long


def test_at_phone_width_nothing_scrolls_sideways_and_status_stays_in_view(web, browser):
    srv = web()
    context = browser.new_context(viewport={"width": 390, "height": 844})
    try:
        page = context.new_page()
        long_name, _ = _fill_for_layout(srv, page)
        width = page.evaluate("() => document.documentElement.scrollWidth")
        assert width <= 390, f"the page is {width} px wide"

        def inside(locator: Any) -> None:
            box = locator.bounding_box()
            assert box is not None
            assert box["x"] >= 0 and box["x"] + box["width"] <= 390, (locator, box)
            assert box["y"] + box["height"] <= 844, (locator, box)

        inside(page.locator("#status"))
        failed = page.locator("#transfers li.failed")
        inside(failed.locator(".stats"))
        inside(failed.get_by_role("button", name=re.compile("^Dismiss")))
        for name in (long_name, "short.txt"):
            for action in ("download", "rename", "delete"):
                button = row(page, name).locator(f"button[data-action='{action}']")
                button.scroll_into_view_if_needed()
                box = button.bounding_box()
                assert box["x"] >= 0 and box["x"] + box["width"] <= 390, (name, action, box)
    finally:
        context.close()


def test_axe_finds_nothing_serious(web, browser, tmp_path):
    """axe-core (tests/page/package.json) in the app view, the login view and at phone width."""
    if not AXE.exists():
        pytest.fail("axe-core is missing: run npm ci --prefix tests/page --no-audit --no-fund")
    source = AXE.read_text()

    def violations(page: Any) -> list[str]:
        page.add_script_tag(content=source)  # an inline script: hence bypass_csp below
        found = page.evaluate(
            """async () => (await axe.run(document, {resultTypes: ["violations"]}))
                .violations.filter(v => v.impact === "serious" || v.impact === "critical")
                .map(v => v.id + ": " + v.nodes.map(n => n.target.join(" ")).join(", "))"""
        )
        return found

    srv = web()
    found: dict[str, list[str]] = {}
    for width in (1280, 390):
        context = browser.new_context(viewport={"width": width, "height": 844}, bypass_csp=True)
        try:
            page = context.new_page()
            _fill_for_layout(srv, page)
            drop_files(page, {"short.txt": 3})  # a question too
            expect(page.locator("#transfers li.asking")).to_have_count(1)
            found[f"files at {width} px"] = violations(page)
        finally:
            context.close()

    users = tmp_path / "users"
    add_user_with_cli(users, "alice")
    with_users = web("--users", str(users))
    context = browser.new_context(bypass_csp=True)
    try:
        page = context.new_page()
        log_in(page, "0123456789abcdef.wrong")
        page.goto(with_users.url)
        expect(page.locator("#messages .banner")).to_be_visible()
        found["login with a refusal"] = violations(page)
    finally:
        context.close()
    assert found == {key: [] for key in found}
