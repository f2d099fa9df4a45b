"""Fashion-MNIST: the four files from the cache, the installed package, or Debian's archive, verified."""
import gzip
import io
import tarfile

import numpy as np
import pytest
import torch

from capsnet.data import fashion_mnist, load_dataset
from capsnet.data.cache import sha256
from capsnet.data.idx import encode_idx
from capsnet.errors import CapsNetError

QUIET = dict(log=lambda *a: None)


def small_files() -> dict[str, bytes]:
    """Four tiny IDX files under Fashion-MNIST's names (raw bytes)."""
    rng = np.random.default_rng(3)
    return {"train-images-idx3-ubyte": encode_idx(rng.integers(0, 256, (6, 28, 28))),
            "train-labels-idx1-ubyte": encode_idx(rng.integers(0, 10, 6)),
            "t10k-images-idx3-ubyte": encode_idx(rng.integers(0, 256, (4, 28, 28))),
            "t10k-labels-idx1-ubyte": encode_idx(rng.integers(0, 10, 4))}


def ar_archive(members: list[tuple[str, bytes]]) -> bytes:
    out = b"!<arch>\n"
    for name, data in members:
        out += f"{name:<16}{0:<12}{0:<6}{0:<6}{'100644':<8}{len(data):<10}`\n".encode() + data
        out += b"\n" if len(data) % 2 else b""  # members start on even offsets
    return out


def debian_package(files: dict[str, bytes], skip: str = "") -> bytes:
    """A .deb laid out as Debian's dataset-fashion-mnist: gzipped IDX files in data.tar.xz."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tar:
        entries = [("./usr/share/doc/dataset-fashion-mnist/copyright", b"MIT\n")]
        entries += [(f"./usr/share/datasets/fashion-mnist/{name}.gz", gzip.compress(raw, mtime=0))  # the same bytes every run
                    for name, raw in files.items() if name != skip]
        for path, data in entries:
            info = tarfile.TarInfo(path)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return ar_archive([("debian-binary", b"2.0\n"), ("control.tar.xz", b"x"), ("data.tar.xz", buf.getvalue())])


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """Small files in place of the real ones, no installed package, mirrors unreachable."""
    files = small_files()
    monkeypatch.setattr(fashion_mnist, "FILES", {name: sha256(raw) for name, raw in files.items()})
    monkeypatch.setattr(fashion_mnist, "SYSTEM_FOLDER", tmp_path / "not-installed")
    monkeypatch.setattr(fashion_mnist, "_from_mirrors", lambda name, log: None)
    return files


def fake_apt_get(monkeypatch, tmp_path, script: str) -> None:
    """An `apt-get` first on PATH that runs `script` (sh) in the folder it is called from."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "apt-get").write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path}/apt-args\n{script}\n")
    (bin_dir / "apt-get").chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))


def test_files_come_out_of_the_package_in_memory():
    files = small_files()
    assert fashion_mnist.files_from_deb(debian_package(files)) == files
    with pytest.raises(CapsNetError, match="x.deb: no t10k-labels-idx1-ubyte under /usr/share/datasets"):
        fashion_mnist.files_from_deb(debian_package(files, skip="t10k-labels-idx1-ubyte"), "x.deb")
    with pytest.raises(CapsNetError, match="x.deb: not an ar archive"):
        fashion_mnist.files_from_deb(b"PK\x03\x04 a zip", "x.deb")
    with pytest.raises(CapsNetError, match="x.deb: corrupt ar archive"):
        fashion_mnist.files_from_deb(debian_package(files)[:-100], "x.deb")  # cut inside data.tar.xz
    with pytest.raises(CapsNetError, match="x.deb: no data.tar member"):
        fashion_mnist.files_from_deb(ar_archive([("debian-binary", b"2.0\n")]), "x.deb")
    tar_xz = fashion_mnist.ar_members(debian_package(files))["data.tar.xz"]
    for start, end in ((len(tar_xz) // 2, len(tar_xz) // 2 + 1),  # tarfile finds this damage: a bad header
                       (len(tar_xz) - 300, len(tar_xz) - 100)):  # the xz reader finds this (lzma.LZMAError)
        damaged = tar_xz[:start] + bytes(end - start) + tar_xz[end:]
        with pytest.raises(CapsNetError, match="x.deb: cannot read its data.tar"):
            fashion_mnist.files_from_deb(ar_archive([("data.tar.xz", damaged)]), "x.deb")


def test_a_file_in_the_package_larger_than_any_sought_is_refused(monkeypatch):
    files = small_files()
    deb = debian_package(files)
    monkeypatch.setattr(fashion_mnist, "MAX_FILE", 4000)  # the images' .gz is 4,743 bytes
    with pytest.raises(CapsNetError, match="x.deb: usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz is "
                                           "4,743 bytes: not one of the files sought"):
        fashion_mnist.files_from_deb(deb, "x.deb")
    files["train-labels-idx1-ubyte"] = encode_idx(np.zeros(10000, np.uint8))  # 10 kB raw, a few dozen bytes packed
    monkeypatch.setattr(fashion_mnist, "MAX_FILE", 6000)
    with pytest.raises(CapsNetError, match="train-labels-idx1-ubyte.gz: larger than 6,000 bytes decompressed"):
        fashion_mnist.files_from_deb(debian_package(files), "x.deb")


def test_fetch_downloads_the_pinned_package_verifies_it_and_keeps_the_files(offline, monkeypatch, tmp_path):
    deb = tmp_path / "package.deb"
    deb.write_bytes(debian_package(offline))
    monkeypatch.setattr(fashion_mnist, "DEB_SHA256", sha256(deb.read_bytes()))
    fake_apt_get(monkeypatch, tmp_path, f"/bin/cp {deb} ./dataset-fashion-mnist_1_all.deb")
    cache = tmp_path / "cache"
    assert fashion_mnist.fetch(cache, **QUIET) == offline
    assert (tmp_path / "apt-args").read_text().split() == ["download", fashion_mnist.DEB]
    for name, raw in offline.items():
        assert (cache / "fashion-mnist" / name).read_bytes() == raw
    (tmp_path / "apt-args").unlink()
    data = load_dataset("fashion-mnist", cache, **QUIET)  # from the cache now: no second download
    assert not (tmp_path / "apt-args").exists()
    assert data.name == "fashion-mnist" and data.train_images.shape == (6, 1, 28, 28)
    assert data.test_labels.tolist() == list(offline["t10k-labels-idx1-ubyte"][8:])


def test_a_package_with_another_checksum_is_not_read(offline, monkeypatch, tmp_path):
    deb = tmp_path / "package.deb"
    deb.write_bytes(debian_package(offline))
    fake_apt_get(monkeypatch, tmp_path, f"/bin/cp {deb} ./dataset-fashion-mnist_1_all.deb")
    with pytest.raises(CapsNetError, match="_1_all.deb: not the Debian build capsnet pins .*, refusing to read it"):
        fashion_mnist.fetch(tmp_path / "cache", **QUIET)
    assert not (tmp_path / "cache" / "fashion-mnist" / "train-images-idx3-ubyte").exists()


def test_without_apt_get_or_when_it_fails_the_error_says_what_to_do(offline, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(CapsNetError, match="no apt-get on this machine .* into the data directory's fashion-mnist"):
        fashion_mnist.fetch(tmp_path / "cache", **QUIET)
    fake_apt_get(monkeypatch, tmp_path, "echo 'E: Unable to locate package dataset-fashion-mnist' >&2; exit 100")
    with pytest.raises(CapsNetError, match="apt-get download dataset-fashion-mnist=.* failed: E: Unable to locate"):
        fashion_mnist.fetch(tmp_path / "cache", **QUIET)


def test_an_installed_package_is_copied_without_any_download(offline, monkeypatch, tmp_path):
    installed = tmp_path / "usr-share"
    installed.mkdir()
    for name, raw in offline.items():
        (installed / f"{name}.gz").write_bytes(gzip.compress(raw, mtime=0))  # the same bytes every run
    monkeypatch.setattr(fashion_mnist, "SYSTEM_FOLDER", installed)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no apt-get: a download would fail
    assert fashion_mnist.fetch(tmp_path / "cache", **QUIET) == offline
    (installed / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(offline["t10k-labels-idx1-ubyte"][:-1]))
    with pytest.raises(CapsNetError, match="t10k-labels-idx1-ubyte: truncated"):  # verified like any source
        fashion_mnist.fetch(tmp_path / "other-cache", **QUIET)


def test_real_fashion_mnist_is_the_published_one():
    data = load_dataset("fashion-mnist", None, **QUIET)  # the first time: from a mirror or Debian's archive
    assert data.train_images.shape == (60000, 1, 28, 28) and data.test_images.shape == (10000, 1, 28, 28)
    assert torch.bincount(data.train_labels).tolist() == [6000] * 10
    assert torch.bincount(data.test_labels).tolist() == [1000] * 10
    assert data.train_labels[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]  # ankle boot, T-shirt, T-shirt, dress...
