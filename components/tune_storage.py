"""Where a Tune search keeps its state, and whether that state can be restored after the driver was killed.

Tune saves the search's state (``experiment_state-*.json``, the searcher's ``*-state-*.json`` pickles, ``tuner.pkl``)
in a local staging folder and copies it to ``ray.storage_path`` from a background thread; on a local folder that copy
opens each file, truncating it, and then writes it. A driver killed inside that window left an empty searcher state
behind (Ray 2.60): on the rerun ``Tuner.restore`` failed on it and Tune silently started the experiment again with
an empty search space, and the stage died on a missing hyperparameter.

:func:`resumable` reads every state file before a restore, without unpickling it (a JSON parse, or a walk over the
pickle's opcodes to its ``STOP``: :func:`unreadable_state`). A search whose state is cut off is set aside (renamed
``<name>.unreadable-<time>``, kept to look at) with a warning, and the stage starts the search again, rather than
half-restoring it.

Tried and dropped: handing Tune a file system that writes each file under a temporary name and renames it over its
target. No file was cut off any more, but the copy, now in Python, took longer between one file and the next, and a
kill between them left a searcher state one step older than the experiment state: the restored searcher waited for
a trial it believed was still running, and the search never ended (a CI run hung). Tune's files are not written as
one set; hpmkd checks them instead.
"""

from __future__ import annotations

import json
import logging
import pickletools
import time
from pathlib import Path

import pyarrow.fs
from ray import tune

from hpmkd.data.storage import is_uri

log = logging.getLogger("hpmkd")

#: the suffixes of the state files Tune keeps at the top of an experiment folder
STATE_SUFFIXES = (".json", ".pkl")
#: the suffix of a search folder set aside because its state was cut off
SET_ASIDE_INFIX = ".unreadable-"


def search_storage(storage_path: str) -> tuple[pyarrow.fs.FileSystem, str]:
    """The file system of ``storage_path`` and the path in it (a local folder made absolute)."""
    if is_uri(storage_path):
        return pyarrow.fs.FileSystem.from_uri(storage_path)
    return pyarrow.fs.LocalFileSystem(), str(Path(storage_path).resolve())


def whole_pickle(data: bytes) -> bool:
    """Whether ``data`` is a complete pickle: its opcodes parse up to ``STOP``. Nothing is unpickled."""
    try:
        ops = list(pickletools.genops(data))
    except ValueError:  # cut off inside an opcode
        return False
    return bool(ops) and ops[-1][0].name == "STOP"


def readable(data: bytes) -> bool:
    """Whether a Tune state file is whole: JSON that parses, or a complete pickle (Tune's searcher states are
    pickles named ``.json``)."""
    try:
        json.loads(data)
        return True
    except (ValueError, UnicodeDecodeError):
        return whole_pickle(data)


def unreadable_state(fs: pyarrow.fs.FileSystem, path: str) -> str | None:
    """The name of the first state file of the search at ``path`` on ``fs`` that is cut off (``None``: all whole)."""
    found = fs.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True))
    for info in sorted(found, key=lambda i: i.base_name):
        if info.type != pyarrow.fs.FileType.File or not info.base_name.endswith(STATE_SUFFIXES):
            continue
        with fs.open_input_stream(info.path) as f:
            if not readable(f.readall()):
                return info.base_name
    return None


def resumable(fs: pyarrow.fs.FileSystem, path: str) -> bool:
    """Whether the search at ``path`` on ``fs`` can be restored: Tune finds its state there and every state file is
    whole. A search whose state is cut off is set aside (renamed ``<path>.unreadable-<time>``, kept for inspection)
    with a warning, so that the caller starts it again under its own name."""
    if not tune.Tuner.can_restore(path, storage_filesystem=fs):
        return False
    cut_off = unreadable_state(fs, path)
    if cut_off is None:
        return True
    aside = f"{path}{SET_ASIDE_INFIX}{time.strftime('%Y%m%d-%H%M%S')}"
    fs.move(path, aside)
    log.warning("tune: the search's state file %s at %s is cut off, so the search cannot resume; it starts again "
                "(its earlier trials' runs end FAILED; the unreadable state is kept at %s)", cut_off, path, aside)
    return False
