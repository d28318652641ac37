"""Where a Tune search keeps its state, written so that a driver killed at any moment leaves a state that restores.

Tune saves the search's state (``experiment_state-*.json``, the searcher's ``*-state-*.json`` pickles, ``tuner.pkl``)
in a local staging folder and copies it to ``ray.storage_path`` from a background thread; on a local folder that copy
opens each file, truncating it, and then writes it. A driver killed inside that window left an empty searcher state
behind (Ray 2.60): on the rerun ``Tuner.restore`` failed on it and Tune silently started the experiment again with
an empty search space. Two guards:

* :func:`search_storage`: a local ``storage_path`` gets :class:`WholeFiles`, a pyarrow file system whose files are
  written to a temporary name beside their target and renamed over it when closed (a rename within a folder is
  atomic on POSIX), so a copy cut off mid-write leaves the previous version whole. Trial checkpoints are written
  through it too. An object store (``s3://``, ``gs://``) writes each object whole already and is used as it is.
* :func:`resumable`: before restoring, every state file is read without being unpickled (a JSON parse, or a walk
  over the pickle's opcodes to its ``STOP``, :func:`unreadable_state`); a search whose state is cut off anyway (written
  by an older hpmkd, or on a full disk) is set aside and started again, with a warning, rather than half-restored.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickletools
import time
import uuid
from pathlib import Path

import pyarrow
import pyarrow.fs
from fsspec.implementations.local import LocalFileSystem
from ray import tune

from hpmkd.data.storage import is_uri

log = logging.getLogger("hpmkd")

#: the suffixes of the state files Tune keeps at the top of an experiment folder
STATE_SUFFIXES = (".json", ".pkl")
#: the infix of a file still being written (``.<name>.partial-<random>``, in its target's folder)
PARTIAL_INFIX = ".partial-"
#: the suffix of a search folder set aside because its state was cut off
SET_ASIDE_INFIX = ".unreadable-"


class _RenamedOnClose(io.FileIO):
    """A file written under a temporary name in its target's folder, renamed to the target when closed."""

    def __init__(self, target: str):
        self.target = target
        folder, name = os.path.split(target)
        super().__init__(os.path.join(folder, f".{name}{PARTIAL_INFIX}{uuid.uuid4().hex}"), "wb")

    def close(self) -> None:
        if self.closed:
            return
        super().close()
        os.replace(self.name, self.target)


class WholeFiles(pyarrow.fs.FSSpecHandler):
    """The local file system, except that a file opened for writing appears only once it is whole."""

    def __init__(self) -> None:
        super().__init__(LocalFileSystem())

    def open_output_stream(self, path: str, metadata: dict | None) -> pyarrow.NativeFile:
        return pyarrow.PythonFile(_RenamedOnClose(path), mode="w")


def search_storage(storage_path: str) -> tuple[pyarrow.fs.FileSystem, str]:
    """The file system Tune writes ``storage_path`` through, and the path in it: a local folder (made absolute) gets
    :class:`WholeFiles`, a URI the file system it names."""
    if is_uri(storage_path):
        return pyarrow.fs.FileSystem.from_uri(storage_path)
    return pyarrow.fs.PyFileSystem(WholeFiles()), str(Path(storage_path).resolve())


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
