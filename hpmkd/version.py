"""The package version and a fingerprint of the code that computes results (part of every stage's content key)."""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

__version__ = "0.1.0"

CODE_PACKAGES = ("hpmkd", "components", "pipelines")
#: sources that only read or present results (reports, the command line): editing them must not invalidate reuse
PRESENTATION_ONLY = ("components/report/", "hpmkd/cli.py")


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """sha256 over the Python sources of the packages that compute results, so an edit invalidates reuse."""
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256(__version__.encode())
    for package in CODE_PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            if path.relative_to(root).as_posix().startswith(PRESENTATION_ONLY):
                continue
            digest.update(str(path.relative_to(root)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:12]
