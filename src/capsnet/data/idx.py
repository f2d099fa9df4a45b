"""The IDX format of the MNIST files: a big-endian header, then raw uint8 values.

Header: 2 zero bytes, a type code (0x08 = unsigned byte), the number of dimensions n,
then n big-endian uint32 sizes. Images are 0x00000803 (3 dims), labels 0x00000801.
"""
from __future__ import annotations

import gzip
import struct
import zlib

import numpy as np

from ..errors import CapsNetError

UBYTE = 0x08


def encode_idx(array: np.ndarray) -> bytes:
    """uint8 array -> IDX bytes."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">BBBB", 0, 0, UBYTE, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.tobytes()


def decode_idx(data: bytes, *, name: str = "IDX data", ndim: int | None = None) -> np.ndarray:
    """IDX bytes (gzip-compressed or not) -> uint8 array. Errors name the file."""
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as exc:  # zlib.error: a damaged body behind a good header
            raise CapsNetError(f"{name}: corrupt or truncated gzip data ({exc})") from None
    if len(data) < 4:
        raise CapsNetError(f"{name}: truncated ({len(data)} bytes, no IDX header)")
    zero1, zero2, dtype, dims = struct.unpack(">BBBB", data[:4])
    if zero1 or zero2 or dtype != UBYTE or dims == 0 or (ndim is not None and dims != ndim):
        want = f"0x0000080{ndim}" if ndim else "0x000008xx"
        raise CapsNetError(f"{name}: bad magic number 0x{data[:4].hex()} (expected {want}): not an IDX file of this kind")
    header = 4 + 4 * dims
    if len(data) < header:
        raise CapsNetError(f"{name}: truncated header")
    shape = struct.unpack(f">{dims}I", data[4:header])
    expected = header + int(np.prod(shape))
    if len(data) != expected:
        raise CapsNetError(f"{name}: truncated or padded: {len(data)} bytes, header promises {expected}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)
