"""Reader for the IDX format of MNIST / Fashion-MNIST (http://yann.lecun.com/exdb/mnist/, "FILE FORMATS").

An IDX file is a 4-byte magic number ``0x00 0x00 <type> <ndim>``, then ``ndim`` big-endian uint32 dimension sizes,
then the values in row-major order, big-endian. Files may be gzip-compressed (detected by the gzip magic bytes).
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np

from hpmkd.data.storage import UriPath, read_bytes

#: IDX type byte -> NumPy dtype (big-endian where it matters).
IDX_TYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

GZIP_MAGIC = b"\x1f\x8b"


class IdxFormatError(ValueError):
    """A file is not a valid IDX file; the message names the file and what is wrong."""


def read_idx(path: str | Path | UriPath) -> np.ndarray:
    """The array stored in the IDX file ``path`` (plain or gzip; a local path or a file-system URI,
    :mod:`hpmkd.data.storage`), with the shape given by its header."""
    data = read_bytes(path)
    if data[:2] == GZIP_MAGIC:
        try:
            data = zlib.decompress(data, wbits=16 + zlib.MAX_WBITS)
        except zlib.error as err:
            raise IdxFormatError(f"{path}: the gzip stream is truncated or corrupt ({err}); the file is damaged "
                                 "(download it again).") from None
    return parse_idx(data, str(path))


def parse_idx(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Parse the bytes of an (uncompressed) IDX file; ``name`` is used in error messages."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise IdxFormatError(f"{name}: not an IDX file (the magic number must start with two zero bytes).")
    type_code, ndim = data[2], data[3]
    if type_code not in IDX_TYPES:
        known = ", ".join(f"0x{c:02X}" for c in IDX_TYPES)
        raise IdxFormatError(f"{name}: unknown IDX data type 0x{type_code:02X} (known: {known}).")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise IdxFormatError(f"{name}: truncated header ({len(data)} bytes, {ndim} dimensions need {header}).")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = IDX_TYPES[type_code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        raise IdxFormatError(
            f"{name}: header says shape {dims} of {dtype} ({expected} bytes) but the file holds {len(data) - header} "
            "bytes of data; the file is truncated or corrupt (download it again)."
        )
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
    return array.astype(dtype.newbyteorder("="), copy=False)
