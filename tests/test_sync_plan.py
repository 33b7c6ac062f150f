"""wsfiles.sync.plan, localtree: the rules of issue 19, table by table (pure, no network)."""

from __future__ import annotations

import hashlib
import os
import re
from datetime import datetime

import pytest

from wsfiles.sync.guard import TooManyDeletes, big_deletes, check_deletes
from wsfiles.sync.localtree import (
    EMPTY_SHA256,
    conflict_name,
    is_excluded,
    is_quiet,
    is_stable,
    local_sha256,
    scan,
)
from wsfiles.sync.model import Action, Kind, LocalFile, Plan, RemoteFile, Synced
from wsfiles.sync.plan import reconcile

NOW = 2_000_000_000.0  # seconds
OLD_NS = 1_900_000_000 * 10**9  # long before NOW: quiet
NEW_NS = 1_950_000_000 * 10**9
WHEN = datetime(2026, 12, 5, 1, 2, 3)
STAMP = "2026-12-05 010203"


def sha(content: str) -> str:
    return hashlib.sha256(content.encode()).hexdigest()


def inode(path: str) -> int:
    return int(sha("inode " + path)[:8], 16)


class World:
    """Both sides and the state, from contents; local stat data matches the
    state row exactly when the local content is the synced content."""

    def __init__(
        self,
        local: dict[str, str],
        remote: dict[str, str],
        synced: dict[str, str],
    ) -> None:
        self.contents = dict(local)
        self.state = {
            p: Synced(p, len(c), sha(c), OLD_NS, inode(p), 1.9e9) for p, c in synced.items()
        }
        self.local = {}
        for path, content in local.items():
            same = synced.get(path) == content
            self.local[path] = LocalFile(
                path, len(content), OLD_NS if same else NEW_NS, inode(path)
            )
        self.remote = {}
        for path, content in remote.items():
            self.remote[path] = RemoteFile(path, len(content), 1.9e9, sha(content))
        self.hashed: list[str] = []

    def hash(self, path: str) -> str:
        self.hashed.append(path)
        return sha(self.contents[path])

    def plan(self, direction="both", **kw):
        return reconcile(
            self.local, self.remote, self.state, self.hash, direction, NOW, "host", when=WHEN, **kw
        )


def brief(plan) -> list[tuple]:
    return [(a.kind.value, a.path) + ((a.to,) if a.to else ()) for a in plan.actions]


def cname(stem: str, ext: str = "") -> str:
    return f"{stem} (conflict host {STAMP}){ext}"


# (case, local, remote, synced, expected actions, expected hashed paths)
CASES = [
    (
        "first sync both ways",
        {"a": "1", "same": "s", "c.txt": "x"},
        {"b": "2", "same": "s", "c.txt": "y"},
        {},
        [
            ("conflict", "c.txt", cname("c", ".txt")),
            ("download", "b"),
            ("upload", "a"),
            ("upload", cname("c", ".txt")),
            ("record", "same"),
        ],
        ["c.txt", "same"],  # "a" is new on one side only: the runner hashes it while sending
    ),
    (
        "nothing changed: empty plan, nothing read",
        {"a": "1", "d/b": "2", "d/e/c": "3"},
        {"a": "1", "d/b": "2", "d/e/c": "3"},
        {"a": "1", "d/b": "2", "d/e/c": "3"},
        [],
        [],
    ),
    ("edited here", {"a": "new"}, {"a": "old"}, {"a": "old"}, [("upload", "a")], ["a"]),
    ("edited on the server", {"a": "old"}, {"a": "new"}, {"a": "old"}, [("download", "a")], []),
    ("deleted here", {}, {"a": "old"}, {"a": "old"}, [("delete_remote", "a")], []),
    ("deleted on the server", {"a": "old"}, {}, {"a": "old"}, [("delete_local", "a")], []),
    ("new here, never synced: copied", {"a": "1"}, {}, {}, [("upload", "a")], []),
    ("new on the server, never synced: copied", {}, {"a": "1"}, {}, [("download", "a")], []),
    (
        "both changed: conflict, both kept",
        {"d/a.txt": "mine"},
        {"d/a.txt": "theirs"},
        {"d/a.txt": "old"},
        [
            ("conflict", "d/a.txt", "d/" + cname("a", ".txt")),
            ("upload", "d/" + cname("a", ".txt")),
        ],
        ["d/a.txt"],
    ),
    (
        "both changed the same way: only recorded",
        {"a": "new"},
        {"a": "new"},
        {"a": "old"},
        [("record", "a")],
        ["a"],
    ),
    (
        "deleted here, modified on the server: restored",
        {},
        {"a": "new"},
        {"a": "old"},
        [("download", "a")],
        [],
    ),
    (
        "deleted on the server, modified here: restored",
        {"a": "new"},
        {},
        {"a": "old"},
        [("upload", "a")],
        [],
    ),
    (
        "renamed here",
        {"d/b": "old"},
        {"a": "old"},
        {"a": "old"},
        [("rename_remote", "a", "d/b")],
        ["d/b"],
    ),
    (
        "renamed on the server",
        {"a": "old"},
        {"b": "old"},
        {"a": "old"},
        [("rename_local", "a", "b")],
        [],
    ),
    (
        "renamed and edited here: delete and upload",
        {"b": "edited"},
        {"a": "old"},
        {"a": "old"},
        [("delete_remote", "a"), ("upload", "b")],
        [],
    ),
    (
        "renamed here, edited on the server: restored beside the new name",
        {"b": "old"},
        {"a": "new"},
        {"a": "old"},
        [("download", "a"), ("upload", "b")],
        [],
    ),
    ("gone from both sides: the row is forgotten", {}, {}, {"a": "old"}, [("forget", "a")], []),
    (
        "new empty files are never read",
        {"e": ""},
        {"e": ""},
        {},
        [("record", "e")],
        [],
    ),
]


@pytest.mark.parametrize(
    ("local", "remote", "synced", "expected", "hashed"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_rules(local, remote, synced, expected, hashed):
    world = World(local, remote, synced)
    plan = world.plan()
    assert brief(plan) == expected
    assert sorted(world.hashed) == sorted(hashed)
    assert plan.skipped == [] and plan.waiting == []


def test_preconditions_and_digests_carried_by_the_actions():
    world = World(
        {"up": "new", "gone": "x", "c": "mine", "r2": "old2"},
        {"up": "old", "down": "new", "del": "old", "c": "theirs", "r1": "old2"},
        {"up": "old", "down": "old", "del": "old", "gone": "x", "c": "old", "r1": "old2"},
    )
    actions = {(a.kind, a.path): a for a in world.plan().actions}
    upload = actions[(Kind.UPLOAD, "up")]
    assert (upload.sha256, upload.expect_remote_sha256, upload.size) == (sha("new"), sha("old"), 3)
    download = actions[(Kind.DOWNLOAD, "down")]
    assert (download.sha256, download.expect_remote_sha256) == (sha("new"), sha("new"))
    assert actions[(Kind.DELETE_REMOTE, "del")].expect_remote_sha256 == sha("old")
    assert actions[(Kind.DELETE_LOCAL, "gone")].expect_remote_sha256 is None
    conflict = actions[(Kind.CONFLICT, "c")]
    assert (conflict.to, conflict.sha256, conflict.expect_remote_sha256) == (
        cname("c"),
        sha("theirs"),
        sha("theirs"),
    )
    copy = actions[(Kind.UPLOAD, cname("c"))]
    # if_absent (no expected server digest), the local loser's content.
    assert (copy.sha256, copy.expect_remote_sha256) == (sha("mine"), None)
    rename = actions[(Kind.RENAME_REMOTE, "r1")]
    assert (rename.to, rename.expect_remote_sha256) == ("r2", sha("old2"))


def test_new_file_deleted_on_the_server_is_uploaded_if_absent():
    world = World({"a": "new"}, {}, {"a": "old"})
    (upload,) = world.plan().actions
    assert (upload.kind, upload.expect_remote_sha256) == (Kind.UPLOAD, None)


def test_touched_file_with_the_same_content_is_recorded_not_sent():
    world = World({"a": "same"}, {"a": "same"}, {"a": "same"})
    world.local["a"] = LocalFile("a", 4, NEW_NS, inode("a"))
    assert brief(world.plan()) == [("record", "a")]
    assert world.hashed == ["a"]


def test_touched_here_and_deleted_or_renamed_on_the_server_is_kept():
    # Only a file exactly as last synced follows the server's delete or rename.
    world = World({"a": "same", "b": "same2"}, {"c": "same2"}, {"a": "same", "b": "same2"})
    world.local["a"] = LocalFile("a", 4, NEW_NS, inode("a"))
    world.local["b"] = LocalFile("b", 5, NEW_NS, inode("b"))
    assert brief(world.plan()) == [("download", "c"), ("upload", "a"), ("upload", "b")]
    assert world.hashed == []


def test_server_entries_without_digest_compare_by_size():
    world = World({"a": "old", "b": "old"}, {"a": "old", "b": "old"}, {"a": "old", "b": "old"})
    world.remote["a"] = RemoteFile("a", 3, 1.9e9, None)  # same size: unchanged
    world.remote["b"] = RemoteFile("b", 5, 1.9e9, None)  # another size: changed
    plan = world.plan()
    assert brief(plan) == [("download", "b")]
    assert plan.actions[0].sha256 is None
    assert world.hashed == []


# -- directions ----------------------------------------------------------------

MIXED = (
    {"a": "edited", "d": "old", "e": "new", "g": "mine", "h": "hh"},
    {"b": "edited", "c": "old", "f": "new", "g": "theirs", "i": "hh"},
    {"a": "old", "b": "old", "c": "old", "d": "old", "g": "old", "h": "hh"},
)


def test_both_directions():
    assert brief(World(*MIXED).plan()) == [
        ("rename_local", "h", "i"),
        ("conflict", "g", cname("g")),
        ("delete_local", "d"),
        ("delete_remote", "c"),
        ("download", "b"),
        ("download", "f"),
        ("upload", "a"),
        ("upload", "e"),
        ("upload", cname("g")),
    ]


def test_up_only_never_touches_local_files():
    plan = World(*MIXED).plan("up")
    assert brief(plan) == [("delete_remote", "c"), ("upload", "a"), ("upload", "e")]
    assert plan.skipped == [
        ("g", "changed on both sides: left alone (up-only never changes local files)")
    ]


def test_down_only_never_touches_the_server():
    plan = World(*MIXED).plan("down")
    assert brief(plan) == [
        ("rename_local", "h", "i"),
        ("conflict", "g", cname("g")),
        ("delete_local", "d"),
        ("download", "b"),
        ("download", "f"),
    ]
    assert plan.skipped == []


def test_unknown_direction_is_refused():
    with pytest.raises(ValueError, match="direction"):
        World({}, {}, {}).plan("sideways")


# -- what the plan leaves alone --------------------------------------------------


def test_a_file_being_written_waits_and_is_not_read():
    world = World({"busy": "half", "old": "x"}, {"old": "x"}, {"old": "x"})
    world.local["busy"] = LocalFile("busy", 4, int((NOW - 0.5) * 1e9), 7)
    world.local["old"] = LocalFile("old", 1, int((NOW - 1.0) * 1e9), inode("old"))
    plan = world.plan()
    assert (plan.actions, plan.waiting, world.hashed) == ([], ["busy", "old"], [])
    # Two seconds on, both are quiet: "busy" is sent, "old" (touched) recorded.
    plan = reconcile(world.local, world.remote, world.state, world.hash, "both", NOW + 2, "h")
    assert brief(plan) == [("upload", "busy"), ("record", "old")]


def test_a_file_just_synced_is_not_waiting():
    world = World({"fresh": "x"}, {"fresh": "y"}, {"fresh": "x"})
    recent = int((NOW - 0.5) * 1e9)
    world.local["fresh"] = LocalFile("fresh", 1, recent, 9)
    world.state["fresh"] = Synced("fresh", 1, sha("x"), recent, 9, NOW - 0.5)
    plan = world.plan()
    assert (brief(plan), plan.waiting, world.hashed) == ([("download", "fresh")], [], [])


def test_skipped_local_entries_are_not_read_as_deleted():
    world = World({}, {"link": "x", "dir/a": "y", "other": "z"}, {"link": "x", "dir/a": "y"})
    skipped = [("dir", "cannot read folder: Permission denied"), ("link", "symbolic link")]
    plan = world.plan(skipped=skipped)
    assert brief(plan) == [("download", "other")]
    assert plan.skipped == skipped


def test_excluded_paths_are_left_alone_on_both_sides():
    world = World({"a.tmp": "1"}, {"b.tmp": "2", "build/x/y.o": "3"}, {"build/x/y.o": "3"})
    plan = world.plan(excludes=["*.tmp", "build"])
    assert (plan.actions, plan.skipped, world.hashed) == ([], [], [])


def test_a_file_against_a_folder_is_left_alone_with_a_warning():
    world = World({"x": "file", "ok": "1"}, {"x/y": "in a folder"}, {})
    plan = world.plan()
    assert brief(plan) == [("upload", "ok")]
    assert plan.skipped == [("x", "a file on one side and a folder on the other: left alone")]


def test_unreadable_and_vanished_files_are_left_for_later():
    world = World({"gone": "1", "locked": "2"}, {"gone": "x", "locked": "y"}, {})

    def failing(path: str) -> str:
        if path == "gone":
            raise FileNotFoundError(2, "No such file or directory")
        raise PermissionError(13, "Permission denied")

    plan = reconcile(world.local, world.remote, {}, failing, "both", NOW, "h")
    assert plan.actions == []
    assert plan.waiting == ["gone"]
    assert plan.skipped == [("locked", "cannot read it: Permission denied")]


# -- renames ---------------------------------------------------------------------


def test_renames_pair_by_inode_then_base_name():
    # A folder renamed with two files of equal content.
    world = World({"b/1": "same", "b/2": "same"}, {"a/1": "same", "a/2": "same"}, {})
    world.state = {p: Synced(p, 4, sha("same"), OLD_NS, inode(p), 1.9e9) for p in ("a/1", "a/2")}
    assert brief(world.plan()) == [("rename_remote", "a/1", "b/1"), ("rename_remote", "a/2", "b/2")]
    # Same inode beats the name: a/1 was moved to b/2 (and a/2 to b/1).
    world.local["b/2"] = LocalFile("b/2", 4, NEW_NS, inode("a/1"))
    world.local["b/1"] = LocalFile("b/1", 4, NEW_NS, inode("a/2"))
    assert brief(world.plan()) == [("rename_remote", "a/1", "b/2"), ("rename_remote", "a/2", "b/1")]


def test_a_rename_target_on_the_server_is_not_a_rename():
    world = World({"b": "old"}, {"a": "old", "b": "old"}, {"a": "old"})
    assert brief(world.plan()) == [("delete_remote", "a"), ("record", "b")]


def test_renamed_on_the_server_and_edited_here_keeps_both():
    world = World({"a": "edited"}, {"b": "old"}, {"a": "old"})
    assert brief(world.plan()) == [("download", "b"), ("upload", "a")]


# -- conflict names ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("report.pdf", f"report (conflict laptop {STAMP}).pdf"),
        ("d/e/archive.tar.gz", f"d/e/archive.tar (conflict laptop {STAMP}).gz"),
        (".bashrc", f".bashrc (conflict laptop {STAMP})"),
        ("README", f"README (conflict laptop {STAMP})"),
        ("trailing.", f"trailing. (conflict laptop {STAMP})"),
    ],
)
def test_conflict_name_format(path, expected):
    assert conflict_name(path, "laptop", WHEN) == expected


def test_conflict_name_when_taken_counts_up():
    taken = {f"a (conflict h {STAMP}).txt", f"a (conflict h {STAMP} 2).txt"}
    assert conflict_name("a.txt", "h", WHEN, taken=taken.__contains__) == (
        f"a (conflict h {STAMP} 3).txt"
    )
    with pytest.raises(ValueError, match="no free conflict name"):
        conflict_name("a.txt", "h", WHEN, taken=lambda _: True)


def test_conflict_name_host_cannot_add_separators():
    assert conflict_name("a", "evil/../\x00x", WHEN) == f"a (conflict evil-..--x {STAMP})"


@pytest.mark.parametrize("letter", ["a", "é", "€", "😀"])  # 1, 2, 3 and 4 bytes of UTF-8
@pytest.mark.parametrize("max_name", [255, 100, 60])
def test_conflict_names_never_grow_past_the_name_limit(letter, max_name):
    name = letter * 300 + ".txt"
    long_host = "h" * 80
    for taken in (None, lambda p: " 2)" not in p):
        new = conflict_name("dir/" + name, long_host, WHEN, max_name, taken)
        folder, _, last = new.rpartition("/")
        assert folder == "dir"
        size = len(last.encode("utf-8"))  # valid UTF-8: cut between code points
        assert max_name - 4 <= size <= max_name
        assert last.startswith(letter) and last.endswith(").txt")
        assert f" {STAMP}" in last and "(conflict h" in last


def test_conflict_name_with_a_huge_extension_drops_the_extension():
    new = conflict_name("x." + "e" * 250, "host", WHEN)
    assert len(new.encode()) <= 255 and new.startswith("x.eee")
    assert new.endswith(f"(conflict host {STAMP})")


def test_conflict_in_plan_avoids_taken_names_and_respects_max_name():
    taken = cname("c", ".txt")
    world = World({"c.txt": "mine", taken: "z"}, {"c.txt": "theirs", taken: "z"}, {taken: "z"})
    actions = world.plan().actions
    assert actions[0].to == f"c (conflict host {STAMP} 2).txt"
    long = World({"é" * 120 + ".txt": "mine"}, {"é" * 120 + ".txt": "theirs"}, {})
    conflict = long.plan(max_name=100).actions[0]
    assert conflict.kind is Kind.CONFLICT and len(conflict.to.encode()) <= 100


# -- the local scan --------------------------------------------------------------


def test_scan_keeps_regular_files_and_skips_the_rest(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    (tmp_path / "sub" / "deeper" / "b").write_bytes(b"")
    (tmp_path / "empty").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "a.txt")
    (tmp_path / "dirlink").symlink_to(tmp_path / "sub")
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / ".wsfiles-sync" / "partial").mkdir(parents=True)
    (tmp_path / ".wsfiles-sync" / "state.sqlite3").write_bytes(b"x")
    (tmp_path / "sub" / ".wsfiles-sync").mkdir()  # only the root's is the state folder
    (tmp_path / "sub" / ".wsfiles-sync" / "f").write_bytes(b"x")
    fd = os.open(os.fsencode(tmp_path) + b"/caf\xe9", os.O_WRONLY | os.O_CREAT, 0o600)
    os.close(fd)

    files, skipped = scan(tmp_path)

    assert sorted(files) == ["a.txt", "sub/deeper/b"]
    st = os.stat(tmp_path / "a.txt")
    assert files["a.txt"] == LocalFile("a.txt", 5, st.st_mtime_ns, st.st_ino)
    reasons = dict(skipped)
    assert reasons["caf\\xe9"] == "name is not valid UTF-8"
    assert reasons["link"] == reasons["dirlink"] == "symbolic link (not followed)"
    assert reasons["fifo"] == "special file (FIFO, socket or device)"
    assert reasons["sub/.wsfiles-sync"].startswith("the server would refuse it: ")
    assert ".wsfiles-sync" not in reasons
    assert len(skipped) == 5


def test_scan_skips_names_the_server_refuses(tmp_path):
    for name in ("back\\slash", "ctl\x01", ".wsfiles-x"):
        (tmp_path / name).write_bytes(b"1")
    deep = tmp_path.joinpath(*"abcd")
    deep.mkdir(parents=True)
    (deep / "f").write_bytes(b"1")
    (tmp_path / "a" / "ok").write_bytes(b"1")

    files, skipped = scan(tmp_path, limits={"max_depth": 3, "max_path": 1024})

    assert sorted(files) == ["a/ok"]
    paths = [path for path, _ in skipped]
    assert paths == sorted(["a/b/c/d", "back\\slash", "ctl\\x01", ".wsfiles-x"])
    assert all(reason.startswith("the server would refuse it: ") for _, reason in skipped)
    # The remote folder counts toward the server's limits.
    files, skipped = scan(tmp_path / "a", limits={"max_depth": 2, "max_path": 8}, prefix="top")
    assert (sorted(files), [p for p, _ in skipped]) == (["ok"], ["b/c"])
    files, skipped = scan(tmp_path / "a", limits={"max_depth": 2, "max_path": 5}, prefix="top")
    assert (files, [p for p, _ in skipped]) == ({}, ["b/c", "ok"])


def test_scan_excludes_by_base_name_and_by_relative_path(tmp_path):
    for path in ("a.tmp", "d/b.tmp", "d/keep", "node_modules/x/y", "logs/1", "logs/sub/2"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_bytes(b"1")
    files, skipped = scan(tmp_path, ["*.tmp", "node_modules", "logs/*"])
    assert (sorted(files), skipped) == (["d/keep"], [])
    assert is_excluded("d/b.tmp", ["*.tmp"]) and is_excluded("node_modules/x/y", ["node_modules"])
    assert not is_excluded("d/keep", ["*.tmp", "d/k"])


def test_scan_of_a_missing_root_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        scan(tmp_path / "nope")


def test_local_sha256_and_stability(tmp_path):
    data = os.urandom(3 << 20)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_bytes(data)
    assert local_sha256(tmp_path, "d/f") == hashlib.sha256(data).hexdigest()
    (tmp_path / "e").write_bytes(b"")
    assert local_sha256(tmp_path, "e") == EMPTY_SHA256
    (tmp_path / "l").symlink_to(tmp_path / "e")
    with pytest.raises(OSError):
        local_sha256(tmp_path, "l")
    os.utime(tmp_path / "d" / "f", (100.0, 100.0))
    assert is_stable(tmp_path, "d/f", now=102.5)
    assert not is_stable(tmp_path, "d/f", now=101.0)
    assert not is_stable(tmp_path, "missing", now=1e9)
    f = LocalFile("f", 1, 100 * 10**9, 1)
    assert not is_quiet(f, 101.99) and is_quiet(f, 102.0)
    assert is_quiet(f, 50.0)  # far in the future: does not wait forever


# -- the mass-delete guard (wsfiles/sync/guard.py) --------------------------------


def deletes(kind: Kind, count: int) -> Plan:
    return Plan([Action(kind, f"f{i}") for i in range(count)], [])


@pytest.mark.parametrize(
    ("kind", "count", "local", "remote", "percent", "refused"),
    [
        (Kind.DELETE_REMOTE, 11, 900, 20, 50, "deleting 11 of the 20 files on the server (55%"),
        (Kind.DELETE_LOCAL, 15, 15, 900, 50, "deleting 15 of the 15 files here (100%"),
        (Kind.DELETE_REMOTE, 101, 0, 200, 50, "(50.5%, more than --max-delete 50%)"),
        (Kind.DELETE_REMOTE, 11, 0, 22, 50, None),  # exactly half
        (Kind.DELETE_LOCAL, 11, 22, 11, 50, None),  # half of what is here, whatever the server has
        (Kind.DELETE_REMOTE, 10, 10, 10, 50, None),  # a small round is not guarded
        (Kind.DELETE_LOCAL, 15, 15, 15, 100, None),  # --max-delete 100: no limit
        (Kind.DELETE_REMOTE, 11, 100, 100, 10, "more than --max-delete 10%"),
    ],
)
def test_a_round_deleting_too_much_of_one_side_is_stopped(
    kind, count, local, remote, percent, refused
):
    plan = deletes(kind, count)
    if refused is None:
        check_deletes(plan, local, remote, percent)
        return
    with pytest.raises(TooManyDeletes, match=re.escape(refused)) as stopped:
        check_deletes(plan, local, remote, percent)
    assert "this round changed nothing" in str(stopped.value)


def test_renames_are_not_deletes():
    plan = Plan([Action(Kind.RENAME_REMOTE, f"f{i}", to=f"g{i}") for i in range(50)], [])
    check_deletes(plan, 50, 50, 0)
    assert big_deletes(plan) == frozenset()


def test_only_many_deletes_must_be_seen_twice():
    assert big_deletes(deletes(Kind.DELETE_LOCAL, 10)) == frozenset()
    here = [Action(Kind.DELETE_LOCAL, f"here{i}") for i in range(6)]
    there = [Action(Kind.DELETE_REMOTE, f"there{i}") for i in range(5)]
    assert big_deletes(Plan(here + there, [])) == {a.path for a in here + there}  # 11 in all
