"""The package version and a fingerprint of the code that computes results (part of every stage's content key)."""

from __future__ import annotations

import functools
import hashlib
import importlib.util
from pathlib import Path

__version__ = "0.1.0"

#: the packages whose sources compute results (installed under one name; see pyproject.toml's package-dir)
CODE_PACKAGES = ("hpmkd", "hpmkd.components", "hpmkd.pipelines")
#: sources that only read or present results (reports, the command line, progress display): editing them must not
#: invalidate reuse. Paths are relative to the package named first.
PRESENTATION_ONLY = ("hpmkd.components/report/", "hpmkd/cli.py")


def package_folder(name: str) -> Path:
    """Where package ``name`` lives (a source checkout maps ``hpmkd.components`` to ``components/``)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"package {name!r} not found: install hpmkd (pip install -e .)")
    return Path(list(spec.submodule_search_locations)[0]).resolve()


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """sha256 over the Python sources of the packages that compute results, so an edit invalidates reuse.

    Each file is named by its package and its path inside it, so a source checkout and an installed wheel (where
    ``components/`` sits inside ``hpmkd/``) give the same version."""
    folders = {name: package_folder(name) for name in CODE_PACKAGES}
    digest = hashlib.sha256(__version__.encode())
    for name, folder in folders.items():
        nested = [f for other, f in folders.items() if other != name and f != folder and f.is_relative_to(folder)]
        for path in sorted(folder.rglob("*.py")):
            if any(path.is_relative_to(n) for n in nested):
                continue
            label = f"{name}/{path.relative_to(folder).as_posix()}"
            if label.startswith(PRESENTATION_ONLY):
                continue
            digest.update(label.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:12]
