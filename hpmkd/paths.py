"""File names made from names users choose, and written paths that stay inside their root.

Experiment and stage names are free text in the config (MLflow keeps them as given), but a name such as
``../../x`` or ``/etc/x`` must never become a path. :func:`safe_name` turns a name into one file-name component
(unchanged when it already is a plain one, else a slug plus a hash of the name, so two names never share a
folder), and :func:`inside` joins components under a root and refuses any result that leaves it (a symlink
pointing out included).
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from hpmkd.registry import ConfigError

#: a plain file-name component: letters, digits, '_', '-', '.', not starting with '.', at most 64 characters
PLAIN = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}$")
UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


class UnsafePathError(ConfigError):
    """A path built from a name would leave the folder it belongs in."""


def safe_name(name: str) -> str:
    """``name`` when it is a plain file-name component, otherwise ``<slug>-<8 hex of sha256(name)>`` (the slug keeps
    the name's letters, digits, '.', '_' and '-', at most 48 of them)."""
    if PLAIN.match(name):
        return name
    slug = UNSAFE.sub("-", name).strip(".-")[:48].strip(".-") or "name"
    return f"{slug}-{hashlib.sha256(name.encode('utf-8', 'surrogatepass')).hexdigest()[:8]}"


def inside(root: str | os.PathLike, *parts: str) -> Path:
    """``root / parts``, resolved; :class:`UnsafePathError` when it is not inside ``root`` (resolved too)."""
    base = Path(root).expanduser().resolve()
    path = base.joinpath(*parts).resolve()
    if not path.is_relative_to(base):
        raise UnsafePathError(f"{'/'.join(parts)!r} would be written outside {base} (at {path}); names that become "
                              f"paths may not leave their folder.")
    return path
