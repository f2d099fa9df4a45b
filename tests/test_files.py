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
