"""The web page's folders (protocol 1.2), driven in Debian's Chromium by Playwright.

Same server and browser fixtures as tests/test_page.py: a real ``twistd
wsfiles`` subprocess, and waits for what a person would see, never for a time.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import test_page
from conftest import BIN
from test_page import AXE, CHROMIUM, _json_or_none, connected, drop_files, expect, row

# tests/test_page.py's fixtures: a twistd per test, one Chromium per module.
web = test_page.web
browser = test_page.browser
context = test_page.context
page = test_page.page

pytestmark = pytest.mark.skipif(
    not os.path.exists(CHROMIUM), reason="Debian's chromium is not installed"
)


def crumbs(page) -> Any:
    return page.locator("#crumbs li")


def in_folder(page, *names: str) -> None:
    """The breadcrumbs say the page shows Home / names..."""
    expect(crumbs(page)).to_have_text(["Home", *names])
    expect(page.locator("#crumbs [aria-current=location]")).to_have_text(
        names[-1] if names else "Home"
    )


def open_row(page, name: str) -> None:
    row(page, name).get_by_role("link", name=f"Folder {name}").click()


def run_cli(srv: Any, *args: str) -> None:
    """Another client (the wsfiles command) changes the same folder."""
    subprocess.run([str(BIN / "wsfiles"), args[0], srv.ws_url, *args[1:]], check=True, timeout=60)


def wait_for_files(page, folder: Path, expected: dict[str, bytes]) -> None:
    """Until the server has stored each file (saves are atomic: a file is there
    whole or not at all); a bounded wait on the server's disk."""
    for _ in range(1500):
        if all(_read(folder / path) == data for path, data in expected.items()):
            return
        page.wait_for_timeout(20)
    missing = [path for path, data in expected.items() if _read(folder / path) != data]
    raise AssertionError(f"not stored: {missing}")


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def events_handled(page) -> Any:
    """A waiter for the page to have handled a ``changed`` event of a folder:
    each event is noted in a task queued after the page's own handler ran."""
    page.add_init_script(
        """(() => {
            window.handledEvents = [];
            const Real = WebSocket;
            window.WebSocket = function (url, protocols) {
                const ws = new Real(url, protocols);
                ws.addEventListener("message", (event) => setTimeout(() => {
                    if (typeof event.data !== "string") return;  // file data
                    const message = JSON.parse(event.data);
                    if (message.op === "changed") handledEvents.push(message.path);
                }));
                return ws;
            };
            Object.assign(window.WebSocket, Real);
            window.WebSocket.prototype = Real.prototype;
        })()"""
    )
    return lambda path: page.wait_for_function(
        "(path) => window.handledEvents.includes(path)", arg=path
    )


def frames(page) -> list[dict]:
    """Every command the page sends, as parsed JSON, from now on."""
    sent: list[dict] = []
    page.on(
        "websocket",
        lambda ws: ws.on("framesent", lambda payload: sent.append(_json_or_none(payload) or {})),
    )
    return sent


# -- seeing folders -----------------------------------------------------------------------


def test_folders_open_by_click_and_keyboard_with_breadcrumbs(web, page, tmp_path):
    srv = web()
    (srv.root / "docs" / "2026").mkdir(parents=True)
    (srv.root / "docs" / "2026" / "report.txt").write_bytes(b"the report")
    (srv.root / "docs" / "notes.txt").write_bytes(b"notes")
    (srv.root / "top.txt").write_bytes(b"top")
    sent = frames(page)
    page.goto(srv.url)
    in_folder(page)
    expect(row(page, "docs")).to_contain_text("folder")
    expect(row(page, "top.txt")).to_contain_text("3 B")
    assert page.evaluate("() => link.connection.ws.protocol") == "wsfiles.v1.2"

    open_row(page, "docs")  # a click
    in_folder(page, "docs")
    row(page, "notes.txt").wait_for()
    expect(row(page, "top.txt")).to_have_count(0)
    assert {"op": "list", "path": "docs"} in [
        {k: v for k, v in m.items() if k != "id"} for m in sent
    ]

    # The keyboard: Tab to the folder's link, Enter opens it; focus goes to where we are.
    link = row(page, "2026").get_by_role("link", name="Folder 2026")
    for _ in range(40):
        page.keyboard.press("Tab")
        if page.evaluate("() => document.activeElement.textContent.endsWith('2026')"):
            break
    expect(link).to_be_focused()
    page.keyboard.press("Enter")
    in_folder(page, "docs", "2026")
    expect(page.locator("#crumbs [aria-current=location]")).to_be_focused()
    with page.expect_download() as download:
        row(page, "report.txt").get_by_role("button", name="Download report.txt").click()
    assert download.value.suggested_filename == "report.txt"
    saved = tmp_path / "saved.txt"
    download.value.save_as(saved)
    assert saved.read_bytes() == b"the report"

    # The folder is in the address: a reload stays there; Back goes up.
    assert page.url.endswith("#/docs/2026")
    page.reload()
    in_folder(page, "docs", "2026")
    row(page, "report.txt").wait_for()
    page.go_back()
    in_folder(page, "docs")
    # The breadcrumbs lead up, from the keyboard too.
    page.locator("#crumbs").get_by_role("link", name="Home").focus()
    page.keyboard.press("Enter")
    in_folder(page)
    row(page, "top.txt").wait_for()


def test_a_folder_over_max_list_is_listed_in_pages(web, page):
    """hello carries the top's first page and a cursor; a folder's list too:
    the page follows the cursors until every entry is shown."""
    srv = web()
    for i in range(1003):
        (srv.root / f"t{i:04}.txt").write_bytes(b"")
    many = srv.root / "many"
    many.mkdir()
    for i in range(1002):
        (many / f"f{i:04}.txt").write_bytes(b"x")
    sent = frames(page)
    page.goto(srv.url)
    expect(page.locator("#files tbody tr")).to_have_count(1004)  # 1003 files and "many"
    row(page, "t1002.txt").wait_for()
    open_row(page, "many")
    in_folder(page, "many")
    expect(page.locator("#files tbody tr")).to_have_count(1002)
    row(page, "f1001.txt").wait_for()
    expect(page.locator("#loading")).to_be_empty()
    lists = [m for m in sent if m.get("op") == "list"]
    assert [(m.get("path"), "cursor" in m) for m in lists] == [
        ("", True),
        ("many", False),
        ("many", True),
    ]


def test_live_updates_show_the_folder_in_view_only(web, page, tmp_path):
    srv = web()
    (srv.root / "docs" / "sub").mkdir(parents=True)
    (srv.root / "other").mkdir()
    handled = events_handled(page)
    page.goto(f"{srv.url}/#/docs/sub")
    in_folder(page, "docs", "sub")
    expect(page.locator("#empty")).to_have_text("This folder is empty.")

    local = tmp_path / "new.txt"
    local.write_bytes(b"from the command line")
    run_cli(srv, "put", "--name", "docs/sub/new.txt", str(local))
    row(page, "new.txt").wait_for()
    run_cli(srv, "mkdir", "docs/sub/inner")
    row(page, "inner").wait_for()

    # Another folder's event reaches the page and changes nothing shown.
    run_cli(srv, "put", "--name", "other/elsewhere.txt", str(local))
    handled("other")
    expect(page.locator("#files tbody tr")).to_have_count(2)
    in_folder(page, "docs", "sub")

    # The folder in view is removed by another client: the page goes up and says so.
    run_cli(srv, "rmdir", "-r", "docs/sub")
    in_folder(page, "docs")
    expect(page.locator("#messages .banner")).to_contain_text(
        "The folder “docs/sub” was removed or moved."
    )
    expect(page.locator("#empty")).to_be_visible()


# -- making, uploading ---------------------------------------------------------------------


def test_new_folder_and_uploads_into_the_folder_in_view(web, page, tmp_path):
    srv = web()
    (srv.root / "docs").mkdir()
    page.goto(srv.url)
    open_row(page, "docs")
    in_folder(page, "docs")

    page.once("dialog", lambda dialog: dialog.accept("plans"))
    page.get_by_role("button", name="New folder").click()
    expect(row(page, "plans").get_by_role("link")).to_be_focused()
    assert (srv.root / "docs" / "plans").is_dir()
    page.once("dialog", lambda dialog: dialog.accept("plans"))  # again: it exists
    page.get_by_role("button", name="New folder").click()
    expect(page.locator("#messages .banner")).to_contain_text("Creating the folder “plans” failed")

    picked = tmp_path / "picked.bin"
    picked.write_bytes(os.urandom(300_000))
    page.set_input_files("#picker", str(picked))
    row(page, "picked.bin").wait_for()
    assert (srv.root / "docs" / "picked.bin").read_bytes() == picked.read_bytes()
    drop_files(page, {"dropped.bin": 200_000})
    row(page, "dropped.bin").wait_for()
    assert (srv.root / "docs" / "dropped.bin").read_bytes() == bytes(
        i % 251 for i in range(200_000)
    )
    assert not (srv.root / "picked.bin").exists()

    # Rename stays in the folder.
    page.once("dialog", lambda dialog: dialog.accept("kept.bin"))
    row(page, "dropped.bin").get_by_role("button", name="Rename dropped.bin").click()
    row(page, "kept.bin").wait_for()
    assert (srv.root / "docs" / "kept.bin").exists()


STUB_TREE = """(tree) => {
    // Stub FileSystemEntry objects, as Chromium gives for a folder from the desktop:
    // readEntries answers in batches of two, then an empty batch.
    const entry = (name, node) => typeof node === "string"
        ? {name, isFile: true, isDirectory: false,
           file: (ok) => setTimeout(() => ok(new File([node], name)))}
        : {name, isFile: false, isDirectory: true, createReader() {
              const children = Object.entries(node).map(([n, c]) => entry(n, c));
              return {readEntries: (ok) => setTimeout(() => ok(children.splice(0, 2)))};
          }};
    const items = Object.entries(tree).map(([name, node]) => ({
        kind: "file",
        webkitGetAsEntry: () => entry(name, node),
        getAsFile: () => (typeof node === "string" ? new File([node], name) : null),
    }));
    const event = new Event("drop", {bubbles: true, cancelable: true});
    Object.defineProperty(event, "dataTransfer", {value: {items, files: [], types: ["Files"]}});
    document.querySelector("#drop").dispatchEvent(event);
}"""


def test_a_dropped_folder_uploads_its_whole_tree(web, page):
    """The drop's entries are walked (every batch of readEntries, every
    depth); empty folders are made too; a loose file beside it goes along."""
    srv = web()
    (srv.root / "here").mkdir()
    page.goto(f"{srv.url}/#/here")
    in_folder(page, "here")
    tree = {
        "album": {
            "a.jpg": "A",
            "b.jpg": "BB",
            "c.jpg": "CCC",
            "2026": {"d.jpg": "DDDD", "deep": {"e.jpg": "EEEEE"}},
            "empty": {},
        },
        "loose.txt": "loose",
    }
    page.evaluate(STUB_TREE, tree)
    row(page, "album").wait_for()
    row(page, "loose.txt").wait_for()
    album = srv.root / "here" / "album"
    expected = {
        "a.jpg": b"A",
        "b.jpg": b"BB",
        "c.jpg": b"CCC",
        "2026/d.jpg": b"DDDD",
        "2026/deep/e.jpg": b"EEEEE",
    }
    wait_for_files(page, album, expected)
    assert (album / "empty").is_dir()
    expect(page.locator("#transfers li.failed")).to_have_count(0)
    assert (srv.root / "here" / "loose.txt").read_bytes() == b"loose"


def test_a_folder_chosen_in_the_folder_picker_uploads_its_tree(web, page, tmp_path):
    srv = web()
    local = tmp_path / "project"
    (local / "src" / "lib").mkdir(parents=True)
    (local / "README").write_bytes(b"readme")
    (local / "src" / "main.c").write_bytes(b"int main;")
    (local / "src" / "lib" / "util.c").write_bytes(os.urandom(100_000))
    page.goto(srv.url)
    connected(page)
    page.set_input_files("#folder-picker", str(local))
    row(page, "project").wait_for()
    paths = ("README", "src/main.c", "src/lib/util.c")
    wait_for_files(page, srv.root / "project", {p: (local / p).read_bytes() for p in paths})

    # The same folder again: it is there already, so the page asks first.
    (local / "README").write_bytes(b"readme, second edition")
    page.set_input_files("#folder-picker", str(local))
    question = page.locator("#transfers li.asking")
    expect(question).to_contain_text("A folder named “project” is already here. Upload into it?")
    question.get_by_role("button", name=re.compile("^Upload into")).click()
    expect(page.locator("#transfers li.asking")).to_have_count(0)
    wait_for_files(page, srv.root / "project", {"README": b"readme, second edition"})


# -- moving and deleting ---------------------------------------------------------------------


def test_move_by_dragging_onto_a_folder_and_onto_a_breadcrumb(web, page):
    srv = web()
    (srv.root / "docs").mkdir()
    (srv.root / "docs" / "old").mkdir()
    (srv.root / "memo.txt").write_bytes(b"memo")
    page.goto(srv.url)
    row(page, "memo.txt").drag_to(row(page, "docs"))
    row(page, "memo.txt").wait_for(state="detached")
    assert (srv.root / "docs" / "memo.txt").read_bytes() == b"memo"

    open_row(page, "docs")
    in_folder(page, "docs")
    row(page, "memo.txt").wait_for()
    # A folder too, up to the top through its breadcrumb.
    row(page, "old").drag_to(page.locator("#crumbs").get_by_role("link", name="Home"))
    row(page, "old").wait_for(state="detached")
    assert (srv.root / "old").is_dir() and not (srv.root / "docs" / "old").exists()


def test_move_to_dialog_works_from_the_keyboard(web, page):
    srv = web()
    (srv.root / "a" / "b").mkdir(parents=True)
    (srv.root / "c").mkdir()
    (srv.root / "a" / "note.txt").write_bytes(b"note")
    page.goto(f"{srv.url}/#/a")
    in_folder(page, "a")
    dialog = page.get_by_role("dialog")

    # A folder is never offered as its own destination.
    row(page, "b").get_by_role("button", name="Move folder b").focus()
    page.keyboard.press("Enter")
    expect(dialog).to_be_visible()
    expect(dialog.get_by_role("heading")).to_have_text("Move “b”")
    expect(dialog.get_by_role("button", name="Up to Home")).to_be_focused()
    expect(dialog.get_by_role("button", name="Open folder b")).to_have_count(0)
    expect(dialog.get_by_role("button", name="Move here")).to_be_disabled()  # it is here now
    page.keyboard.press("Escape")
    expect(dialog).to_be_hidden()
    expect(row(page, "b").get_by_role("button", name="Move folder b")).to_be_focused()

    # Opened again before the browser delivers the last closing's "close"
    # event (a fast hand, a loaded machine): that late event must not end
    # the new opening.
    page.keyboard.press("Enter")
    expect(dialog.get_by_role("button", name="Up to Home")).to_be_focused()
    page.evaluate("""() => {
        document.querySelector("#move-dialog").close();
        document.querySelector('[aria-label="Move note.txt"]').click();
    }""")
    expect(dialog.get_by_role("heading")).to_have_text("Move “note.txt”")
    expect(dialog.get_by_role("button", name="Open folder b")).to_be_visible()  # listed
    expect(dialog.get_by_role("button", name="Up to Home")).to_be_focused()
    page.keyboard.press("Enter")  # up to the top
    expect(page.locator("#move-where")).to_have_text("Home")
    expect(dialog.get_by_role("button", name="Open folder a")).to_be_focused()
    page.keyboard.press("Tab")  # to c
    expect(dialog.get_by_role("button", name="Open folder c")).to_be_focused()
    page.keyboard.press("Enter")
    expect(page.locator("#move-where")).to_have_text("c")
    # Focus moved while c is being listed stays where it was put.
    dialog.get_by_role("button", name="Move here").focus()
    expect(dialog.get_by_role("list", name="Folders")).not_to_have_attribute("aria-busy", "true")
    expect(dialog.get_by_role("button", name="Move here")).to_be_focused()
    page.keyboard.press("Enter")
    expect(dialog).to_be_hidden()
    row(page, "note.txt").wait_for(state="detached")
    assert (srv.root / "c" / "note.txt").read_bytes() == b"note"


def test_deleting_a_folder_says_what_goes_with_it_and_cancel_keeps_it(web, page):
    srv = web()
    photos = srv.root / "photos"
    (photos / "2026").mkdir(parents=True)
    (photos / "a.jpg").write_bytes(b"x" * 2048)
    (photos / "2026" / "b.jpg").write_bytes(b"x" * 1024)
    (srv.root / "empty").mkdir()
    page.goto(srv.url)
    dialog = page.get_by_role("alertdialog")

    row(page, "photos").get_by_role("button", name="Delete folder photos").click()
    expect(dialog).to_contain_text(
        "“photos” holds 2 files (3.0 KiB) and 1 folder. All of it will be deleted;"
        " this cannot be undone."
    )
    expect(dialog.get_by_role("button", name="Cancel")).to_be_focused()  # the safe default
    page.keyboard.press("Enter")
    expect(dialog).to_be_hidden()
    assert (photos / "2026" / "b.jpg").exists()

    row(page, "photos").get_by_role("button", name="Delete folder photos").click()
    dialog.get_by_role("button", name="Delete folder and contents").click()
    row(page, "photos").wait_for(state="detached")
    assert not photos.exists()

    row(page, "empty").get_by_role("button", name="Delete folder empty").click()
    expect(dialog).to_contain_text("“empty” is empty.")
    dialog.get_by_role("button", name="Delete folder").click()
    row(page, "empty").wait_for(state="detached")
    assert not (srv.root / "empty").exists()


# -- a 1.1 server, layout, accessibility ----------------------------------------------


def test_against_a_1_1_server_the_page_shows_one_flat_folder(web, page, tmp_path):
    """A server that does not select wsfiles.v1.2 (here: the offer is
    withheld) speaks 1.1: no folders, no folder tools, uploads to the top."""
    srv = web()
    (srv.root / "docs").mkdir()
    (srv.root / "top.txt").write_bytes(b"top")
    page.add_init_script(
        """(() => {
            const Real = WebSocket;
            window.WebSocket = function (url, protocols) {
                return new Real(url, [].concat(protocols || []).filter(p => p !== "wsfiles.v1.2"));
            };
            Object.assign(window.WebSocket, Real);
            window.WebSocket.prototype = Real.prototype;
        })()"""
    )
    page.goto(srv.url)
    row(page, "top.txt").wait_for()
    assert page.evaluate("() => link.connection.ws.protocol") == "wsfiles.v1"
    expect(row(page, "docs")).to_have_count(0)
    expect(page.locator("#where")).to_be_hidden()
    expect(row(page, "top.txt").get_by_role("button", name="Move top.txt")).to_have_count(0)
    drop_files(page, {"new.bin": 1000})
    row(page, "new.bin").wait_for()
    assert (srv.root / "new.bin").read_bytes() == bytes(i % 251 for i in range(1000))


def _fill_folders(srv: Any, page) -> None:
    """A nested folder in view, with a long-named folder, a file, and a long path."""
    deep = srv.root / ("D" * 120) / ("E" * 120)
    (deep / ("F" * 200)).mkdir(parents=True, exist_ok=True)
    (deep / "file.txt").write_bytes(b"x")
    page.goto(srv.url + "/#/" + "D" * 120 + "/" + "E" * 120)
    row(page, "file.txt").wait_for()


def test_folders_at_phone_width_nothing_scrolls_sideways(web, browser):
    srv = web()
    context = browser.new_context(viewport={"width": 390, "height": 844})
    try:
        page = context.new_page()
        _fill_folders(srv, page)

        def fits() -> None:
            width = page.evaluate("() => document.documentElement.scrollWidth")
            assert width <= 390, f"the page is {width} px wide"

        fits()
        for button in (
            page.get_by_role("button", name="New folder"),
            page.get_by_role("button", name="Upload a folder"),
            row(page, "F" * 200).get_by_role("button", name=re.compile("^Delete folder")),
            row(page, "file.txt").get_by_role("button", name="Move file.txt"),
        ):
            button.scroll_into_view_if_needed()
            box = button.bounding_box()
            assert box and box["x"] >= 0 and box["x"] + box["width"] <= 390, box
        row(page, "file.txt").get_by_role("button", name="Move file.txt").click()
        dialog = page.get_by_role("dialog")
        dialog.get_by_role("button", name=re.compile("^Open folder F")).wait_for()
        box = dialog.bounding_box()
        assert box and box["x"] >= 0 and box["x"] + box["width"] <= 390, box
        fits()
    finally:
        context.close()


def test_axe_finds_nothing_serious_in_folders_and_their_dialogs(web, browser):
    if not AXE.exists():
        pytest.fail("axe-core is missing: run npm ci --prefix tests/page --no-audit --no-fund")
    source = AXE.read_text()
    srv = web()
    found: dict[str, list[str]] = {}
    for width in (1280, 390):
        context = browser.new_context(viewport={"width": width, "height": 844}, bypass_csp=True)
        try:
            page = context.new_page()
            _fill_folders(srv, page)
            page.add_script_tag(content=source)  # an inline script: hence bypass_csp
            check = """async () => (await axe.run(document, {resultTypes: ["violations"]}))
                .violations.filter(v => v.impact === "serious" || v.impact === "critical")
                .map(v => v.id + ": " + v.nodes.map(n => n.target.join(" ")).join(", "))"""
            found[f"folder at {width} px"] = page.evaluate(check)
            row(page, "file.txt").get_by_role("button", name="Move file.txt").click()
            page.get_by_role("dialog").get_by_role("button", name=re.compile("^Up to")).wait_for()
            found[f"move dialog at {width} px"] = page.evaluate(check)
            page.keyboard.press("Escape")
            row(page, "F" * 200).get_by_role("button", name=re.compile("^Delete folder")).click()
            expect(page.get_by_role("alertdialog")).to_contain_text("is empty")
            found[f"delete dialog at {width} px"] = page.evaluate(check)
        finally:
            context.close()
    assert found == {key: [] for key in found}
