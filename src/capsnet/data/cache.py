"""A data set's four IDX files in the cache: found, fetched, verified by checksum, kept.

Each data set (mnist.py, fashion_mnist.py) names its files' sha256 (of the raw, uncompressed IDX
content) and how to download what is missing; this module does the rest the same way for all.
"""
from __future__ import annotations

import gzip
import hashlib
import urllib.request
import zlib
from pathlib import Path
from typing import Callable

from ..errors import CapsNetError
from ..files import atomic_write
from .idx import decode_idx

# Downloads the named files (raw IDX bytes, unverified) or raises CapsNetError saying why it cannot.
Download = Callable[[list[str], Callable], dict[str, bytes]]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def verify(name: str, raw: bytes, expected_sha256: str) -> bytes:
    """raw, unless it is not the expected content of file `name`: then one clear error."""
    ndim = 3 if "images" in name else 1
    decode_idx(raw, name=name, ndim=ndim)  # magic and length first: the more useful message
    if sha256(raw) != expected_sha256:
        raise CapsNetError(f"{name}: checksum mismatch (sha256 {sha256(raw)[:16]}..., "
                           f"expected {expected_sha256[:16]}...)")
    return raw


def gunzip(data: bytes, name: str, limit: int | None = None) -> bytes:
    """data decompressed if it is gzip, as it is otherwise; more than `limit` bytes out is an error."""
    if data[:2] != b"\x1f\x8b":
        return data
    try:
        if limit is None:
            return gzip.decompress(data)
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)  # one gzip member, the files' layout
        out = inflater.decompress(data, limit)
    except (OSError, EOFError, zlib.error) as exc:  # zlib.error: a damaged body behind a good header
        raise CapsNetError(f"{name}: corrupt or truncated gzip file ({exc})") from None
    if inflater.unconsumed_tail:
        raise CapsNetError(f"{name}: larger than {limit:,} bytes decompressed: not one of the files sought")
    if not inflater.eof:
        raise CapsNetError(f"{name}: corrupt or truncated gzip file (it ends before its last block)")
    return out


def read_local(folder: Path, name: str) -> bytes | None:
    """The raw bytes of folder/name or folder/name.gz, whichever exists first; None if neither."""
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.exists():
            return gunzip(candidate.read_bytes(), str(candidate))
    return None


def from_mirrors(bases: tuple[str, ...], name: str, expected_sha256: str, log) -> bytes | None:
    """name.gz from the first of these URL prefixes that serves the right content; None if none does."""
    for base in bases:
        try:
            with urllib.request.urlopen(base + name + ".gz", timeout=20) as resp:
                raw = gzip.decompress(resp.read())
            if sha256(raw) == expected_sha256:
                return raw
            log(f"  {base}: {name} has the wrong checksum, skipped")
        except Exception as exc:  # unreachable, refused, timed out, bad gzip: try the next
            log(f"  {base}: {type(exc).__name__}")
    return None


def mirrors_or(missing: list[str], from_mirrors, fallback, fallback_name: str, log) -> dict[str, bytes]:
    """The missing files from the mirrors, or, if any of them fails, all of them from `fallback`."""
    fetched: dict[str, bytes] = {}
    for name in missing:
        raw = from_mirrors(name, log)
        if raw is None:
            break
        fetched[name] = raw
    if len(fetched) < len(missing):
        log(f"  mirrors unreachable: falling back to {fallback_name}")
        fetched = fallback(log)
    return fetched


def fetch_files(folder: Path, checksums: dict[str, str], title: str, download: Download, log=print) -> dict[str, bytes]:
    """Make sure `folder` holds every file of `checksums`, raw and verified; return their bytes.

    Files already there (raw or .gz) are verified and kept; the rest come from `download`,
    are verified, and are written atomically (a crash leaves no half file).
    """
    found: dict[str, bytes] = {}
    for name, expected in checksums.items():
        raw = read_local(folder, name)
        if raw is not None:
            try:
                found[name] = verify(name, raw, expected)
            except CapsNetError as exc:  # a damaged copy in the cache: say where it is and what to do
                raise CapsNetError(f"{exc}; the copy in {folder} is damaged: delete it, and capsnet fetches "
                                   f"it again") from None
            if not (folder / name).exists():  # only a .gz was there: keep the raw file beside it
                atomic_write(folder / name, raw)
    missing = [name for name in checksums if name not in found]
    if not missing:
        return found
    try:  # before any download: a cache that can't be written fails now, in one line
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CapsNetError(f"{folder}: cannot keep the data there ({exc.strerror or exc})") from None
    log(f"{title}: fetching {len(missing)} file(s) into {folder}")
    fetched = download(missing, log)
    for name in missing:
        if name not in fetched:
            raise CapsNetError(f"{title}: the download holds no {name}")
        found[name] = verify(name, fetched[name], checksums[name])
        atomic_write(folder / name, found[name])
    return found
