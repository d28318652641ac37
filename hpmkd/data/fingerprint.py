"""Content fingerprint of a loaded data set.

``fingerprint = sha256(version ‖ name ‖ raw arrays ‖ split indices ‖ preprocessing and loader parameters)[:16]``
(hex). The raw arrays enter with their dtype and shape, so the same bytes read from another folder give the same
fingerprint while any change of content, seed, ``val_fraction``, ``max_*`` or normalisation gives another one.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np

#: Bump when the way splits or preprocessing are computed changes, so old fingerprints stop matching.
FINGERPRINT_VERSION = 1
FINGERPRINT_CHARS = 16


def update_array(digest: "hashlib._Hash", label: str, array: np.ndarray | None) -> None:
    if array is None:
        digest.update(f"{label}:none;".encode())
        return
    array = np.ascontiguousarray(array)
    digest.update(f"{label}:{array.dtype.str}:{array.shape};".encode())
    digest.update(memoryview(array).cast("B"))


def fingerprint(name: str, arrays: dict[str, np.ndarray | None], params: dict[str, Any]) -> str:
    """Hex sha256 prefix over ``name``, the named ``arrays`` (in key order) and the JSON of ``params``."""
    digest = hashlib.sha256(f"hpmkd-data-v{FINGERPRINT_VERSION}:{name};".encode())
    for label in sorted(arrays):
        update_array(digest, label, arrays[label])
    digest.update(json.dumps(params, sort_keys=True, default=float).encode())
    return digest.hexdigest()[:FINGERPRINT_CHARS]
