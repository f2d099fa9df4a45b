"""Fashion-MNIST (Xiao, Rasul and Vollgraf, 2017): MNIST's format and sizes, ten kinds of clothing.

Sources, in order: IDX files already in the data directory (raw or .gz); the same files where
Debian's package dataset-fashion-mnist installs them; the publisher's mirrors; and, for machines
that reach only the package archives, that Debian package itself (`apt-get download`, no
install, no root), read in memory. Whatever the source, each file must match the sha256 of
the published raw IDX content.
"""
from __future__ import annotations

import io
import lzma
import subprocess
import tarfile
import tempfile
from pathlib import Path

from ..errors import CapsNetError
from . import cache

# sha256 of the decompressed IDX files as published (the same bytes in the Debian package).
FILES = {
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
CLASSES = ("T-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
MIRRORS = (
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
)
SYSTEM_FOLDER = Path("/usr/share/datasets/fashion-mnist")  # where the Debian package installs them
DEB = "dataset-fashion-mnist=0.0~git20200523.55506a9-1"
DEB_SHA256 = "39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0"
DEB_FOLDER = "usr/share/datasets/fashion-mnist/"  # inside the package's data.tar
MAX_FILE = 64 << 20  # bytes: the largest file sought (train images) is 47 MB raw


def ar_members(blob: bytes, name: str = "archive") -> dict[str, bytes]:
    """The members of a Unix ar archive (the outer layer of a .deb), by name."""
    if not blob.startswith(b"!<arch>\n"):
        raise CapsNetError(f"{name}: not an ar archive (a .deb starts with !<arch>)")
    members, offset = {}, 8
    while offset + 60 <= len(blob):
        header = blob[offset:offset + 60]
        try:
            size = int(header[48:58])
        except ValueError:
            size = -1
        if header[58:60] != b"`\n" or size < 0 or offset + 60 + size > len(blob):
            raise CapsNetError(f"{name}: corrupt ar archive (bad member header at byte {offset})")
        member = header[:16].decode("ascii", "replace").strip().rstrip("/")
        members[member] = blob[offset + 60:offset + 60 + size]
        offset += 60 + size + (size & 1)  # members start on even offsets
    return members


def files_from_deb(blob: bytes, name: str = "package") -> dict[str, bytes]:
    """The raw IDX files inside the Debian package, read in memory (nothing is extracted to disk)."""
    data = [content for member, content in ar_members(blob, name).items() if member.startswith("data.tar")]
    if not data:
        raise CapsNetError(f"{name}: no data.tar member: not a Debian package")
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data[0]), mode="r:*") as tar:
            for info in tar:
                path = info.name.removeprefix("./")
                stem = path.removeprefix(DEB_FOLDER).removesuffix(".gz")
                if info.isfile() and path.startswith(DEB_FOLDER) and stem in FILES:
                    if info.size > MAX_FILE:
                        raise CapsNetError(f"{name}: {path} is {info.size:,} bytes: not one of the files sought")
                    found[stem] = cache.gunzip(tar.extractfile(info).read(), f"{name}: {path}", limit=MAX_FILE)
    except (tarfile.TarError, EOFError, OSError, lzma.LZMAError) as exc:  # a damaged or cut archive
        raise CapsNetError(f"{name}: cannot read its data.tar ({exc})") from None
    missing = [stem for stem in FILES if stem not in found]
    if missing:
        raise CapsNetError(f"{name}: no {', '.join(missing)} under /{DEB_FOLDER}")
    return found


def _from_deb(log) -> dict[str, bytes]:
    with tempfile.TemporaryDirectory() as tmp:
        try:
            proc = subprocess.run(["apt-get", "download", DEB], cwd=tmp, capture_output=True, text=True)
        except FileNotFoundError:
            raise CapsNetError("Fashion-MNIST: no local files, mirrors unreachable, and no apt-get on this machine "
                               "to fetch Debian's dataset-fashion-mnist: put the four IDX files (raw or .gz) "
                               "into the data directory's fashion-mnist folder") from None
        debs = list(Path(tmp).glob("*.deb"))
        if proc.returncode != 0 or not debs:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise CapsNetError(f"Fashion-MNIST: no local files, mirrors unreachable, and apt-get download "
                               f"{DEB} failed: {last}")
        blob = debs[0].read_bytes()
    if cache.sha256(blob) != DEB_SHA256:  # e.g. another distribution's build of the package
        raise CapsNetError(f"{debs[0].name}: not the Debian build capsnet pins (sha256 "
                           f"{cache.sha256(blob)[:16]}..., expected {DEB_SHA256[:16]}...), refusing to read it")
    log(f"  read the IDX files from {debs[0].name} (sha256 verified)")
    return files_from_deb(blob, debs[0].name)


def _from_mirrors(name: str, log) -> bytes | None:
    return cache.from_mirrors(MIRRORS, name, FILES[name], log)


def _download(missing: list[str], log) -> dict[str, bytes]:
    installed = {name: cache.read_local(SYSTEM_FOLDER, name) for name in missing}
    if all(raw is not None for raw in installed.values()):
        log(f"  copied from {SYSTEM_FOLDER} (Debian's dataset-fashion-mnist)")
        return installed
    return cache.mirrors_or(missing, _from_mirrors, _from_deb, "Debian's package archive", log)


def fetch(data_dir: Path, log=print) -> dict[str, bytes]:
    """Make sure data_dir/fashion-mnist holds the four verified raw IDX files; return their bytes."""
    return cache.fetch_files(Path(data_dir) / "fashion-mnist", FILES, "Fashion-MNIST", _download, log)
