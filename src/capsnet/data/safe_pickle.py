"""A restricted unpickler that builds numpy arrays and nothing else.

A pickle is a program: plain pickle.load runs whatever callable the file names. This one
admits only the three globals numpy needs to rebuild an array and refuses every other.
"""
from __future__ import annotations

import io
import pickle

import numpy as np

from ..errors import CapsNetError


def _reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct as fn  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct as fn
    return fn


_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    # Python 3's protocol-2 pickles spell bytes as _codecs.encode(str, "latin1"): pure data.
    ("_codecs", "encode"): lambda: __import__("codecs").encode,
}


class NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        make = _ALLOWED.get((module, name))
        if make is None:
            raise CapsNetError(f"refusing to unpickle {module}.{name}: only numpy arrays are allowed")
        return make()

    def persistent_load(self, pid):
        raise CapsNetError("refusing to unpickle a persistent reference")


def load_numpy_pickle(data: bytes, *, name: str = "pickle"):
    """Unpickle bytes written by Python 2 or 3 that hold only numpy arrays (in tuples/lists)."""
    try:
        return NumpyOnlyUnpickler(io.BytesIO(data), encoding="latin1").load()
    except CapsNetError as exc:
        raise CapsNetError(f"{name}: {exc}") from None
    except Exception as exc:  # malformed or truncated stream
        raise CapsNetError(f"{name}: not a readable pickle ({type(exc).__name__}: {exc})") from None
