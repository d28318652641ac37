"""hpmkd: multi-teacher, multi-stage knowledge distillation.

The library (this package's own modules) is plain PyTorch, with no Ray or MLflow; ``hpmkd.components`` (Ray- and
MLflow-facing parts) and ``hpmkd.pipelines`` live in the repository's top-level ``components/`` and ``pipelines/``
folders and are installed under this one name (``pyproject.toml``, ``package-dir``). When hpmkd runs straight from a
source checkout without being installed from it (a Ray Job's uploaded working directory, ``PYTHONPATH=.``),
:class:`CheckoutFolders` maps those two names onto the checkout's folders the same way, so every module comes from
the one checkout.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path

from hpmkd.version import __version__

__all__ = ["__version__"]

#: import name -> folder beside this package in a source checkout (as pyproject.toml's package-dir)
CHECKOUT_FOLDERS = {"hpmkd.components": "components", "hpmkd.pipelines": "pipelines"}


class CheckoutFolders(importlib.abc.MetaPathFinder):
    """Finds ``hpmkd.components`` / ``hpmkd.pipelines`` in the checkout ``root``."""

    def __init__(self, root: Path):
        self.root = root

    def find_spec(self, fullname, path=None, target=None):
        folder = CHECKOUT_FOLDERS.get(fullname)
        if folder is None:
            return None
        package = self.root / folder
        return importlib.util.spec_from_file_location(fullname, package / "__init__.py",
                                                      submodule_search_locations=[str(package)])


_root = Path(__file__).resolve().parent.parent
if all((_root / folder / "__init__.py").is_file() for folder in CHECKOUT_FOLDERS.values()):
    sys.meta_path.insert(0, CheckoutFolders(_root))
