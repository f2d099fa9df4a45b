import os
import stat

import pytest

from capsnet.files import atomic_write, write_json


def test_atomic_write_replaces_the_file_whole_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "summary.json"
    write_json(target, {"a": 1})
    write_json(target, {"a": 2})
    assert target.read_text() == '{\n  "a": 2\n}\n'
    assert sorted(p.name for p in target.parent.iterdir()) == ["summary.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "metrics.json"
    atomic_write(target, b"old")
    with pytest.raises(TypeError):
        atomic_write(target, "not bytes")  # fails inside the write
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_new_files_get_the_umask_permissions_and_old_files_keep_theirs(tmp_path):
    old_umask = os.umask(0o022)
    try:
        fresh = tmp_path / "vis.png"
        atomic_write(fresh, b"x")
        assert stat.S_IMODE(fresh.stat().st_mode) == 0o644  # as open() would make it, not mkstemp's 0600
        private = tmp_path / "last.pt"
        private.write_bytes(b"")
        private.chmod(0o600)
        atomic_write(private, b"y")
        assert stat.S_IMODE(private.stat().st_mode) == 0o600
    finally:
        os.umask(old_umask)


def test_a_failed_write_names_the_file_asked_for_not_the_temporary(tmp_path, monkeypatch):
    import errno

    folder = tmp_path / "taken"
    folder.mkdir()
    with pytest.raises(IsADirectoryError) as caught:  # a folder where the file should go
        atomic_write(folder, b"x")
    assert caught.value.filename == str(folder)
    monkeypatch.chdir(tmp_path)  # a relative path too (the temporary's own name is absolute)
    with pytest.raises(IsADirectoryError) as caught:
        atomic_write("taken", b"x")
    assert caught.value.filename == "taken"

    def full(fd):  # a full disk: the error carries no file name at all
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    target = tmp_path / "summary.json"
    with pytest.raises(OSError) as caught:
        atomic_write(target, b"{}")
    assert (caught.value.errno, caught.value.filename) == (errno.ENOSPC, str(target))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]  # no temporary left behind
