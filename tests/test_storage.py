"""The local storage backend: what is listed, what can be opened, atomic saves."""

from __future__ import annotations

import os

import pytest
import pytest_twisted

from wsfiles.storage import IFolder, IStorage, LocalStorage, NotFound, StorageFailure


@pytest.fixture
def storage(tmp_path):
    return LocalStorage(str(tmp_path / "root"))


def test_provides_the_interfaces(storage):
    assert IStorage.providedBy(storage)
    assert IFolder.providedBy(storage.folder(None))


@pytest_twisted.ensureDeferred
async def test_lists_regular_files_only(storage, tmp_path):
    root = tmp_path / "root"
    (root / "b.txt").write_bytes(b"bb")
    (root / "a.txt").write_bytes(b"a")
    (root / "folder").mkdir()
    (root / "link-to-etc").symlink_to("/etc/passwd")
    (root / "link-to-a").symlink_to(root / "a.txt")
    (root / ".wsfiles-other").write_bytes(b"reserved")
    os.close(os.open(os.path.join(os.fsencode(root), b"bad-\xff"), os.O_CREAT | os.O_WRONLY))
    files = await storage.folder(None).list()
    assert [(f.name, f.size) for f in files] == [("a.txt", 1), ("b.txt", 2)]


@pytest_twisted.ensureDeferred
async def test_symlinks_are_not_followed(storage, tmp_path):
    root = tmp_path / "root"
    (root / "link").symlink_to("/etc/passwd")
    folder = storage.folder(None)
    with pytest.raises(NotFound):
        await folder.open_download("link")
    with pytest.raises(NotFound):
        await folder.stat("link")
    with pytest.raises(NotFound):
        await folder.open_download("missing")


@pytest_twisted.ensureDeferred
async def test_client_folder_that_is_a_symlink_is_refused(storage, tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "x").write_bytes(b"x")
    (tmp_path / "root" / "mallory").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(StorageFailure):
        await storage.folder("mallory").list()


@pytest_twisted.ensureDeferred
async def test_client_folders_are_created_and_separate(storage, tmp_path):
    upload = await storage.folder("alice").begin_upload("a", 1)
    upload.write(b"1")
    await upload.commit()
    assert (tmp_path / "root" / "alice" / "a").read_bytes() == b"1"
    assert await storage.folder("bob").list() == []


@pytest_twisted.ensureDeferred
async def test_abort_keeps_the_old_file_and_leaves_no_temp(storage, tmp_path):
    root = tmp_path / "root"
    (root / "f").write_bytes(b"old")
    upload = await storage.folder(None).begin_upload("f", 3)
    upload.write(b"new")
    assert len(os.listdir(root / ".wsfiles-tmp")) == 1
    upload.abort()
    assert (root / "f").read_bytes() == b"old"
    assert os.listdir(root / ".wsfiles-tmp") == []


def test_sweep_removes_leftover_temp_files(tmp_path):
    LocalStorage(str(tmp_path / "root"))
    (tmp_path / "root" / ".wsfiles-tmp" / "upload-123").write_bytes(b"partial")
    again = LocalStorage(str(tmp_path / "root"))
    assert again.sweep_temporary_files() == 1
    assert os.listdir(tmp_path / "root" / ".wsfiles-tmp") == []
