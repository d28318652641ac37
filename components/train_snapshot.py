"""Resume a Ray Train run whose checkpoint-manager snapshot was cut off mid-write.

After each registered checkpoint, Ray Train 2.60's controller rewrites the run's ``checkpoint_manager_snapshot.json``
in place (``CheckpointManager._write_state_to_storage``: open for writing, which truncates, then write). A driver
killed at that moment takes the controller with it and leaves the file empty or cut short, and every later ``fit``
with the run's name fails with ``CheckpointManagerInitializationError`` before a worker starts. The checkpoints
themselves are intact: Ray persists a checkpoint's folder before the controller registers it, and deletes the
previous one only after the snapshot is written.

:func:`recover_cut_snapshot` finds such a run before ``fit``: it sets the unreadable snapshot aside (renamed, so Ray
starts a new one and the evidence stays) and returns the newest checkpoint folder whose ``state.pt`` loads, which the
workers resume from exactly as from ``ray.train.get_checkpoint()``. A folder Ray was still copying when the driver
died does not load and is passed over. The set-aside file, and the checkpoint folders the new snapshot does not
name, stay on storage until the run's folder is removed.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pyarrow.fs
import ray.train

from hpmkd import checkpoint
from hpmkd.checkpoint import CheckpointError
from hpmkd.components.epoch_checkpoints import run_folder

#: Ray Train's name for the run's checkpoint-manager snapshot (``ray.train.v2._internal.constants``)
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"
#: the prefix of the checkpoint folders Ray Train writes in a run's folder; their names sort by time
CHECKPOINT_PREFIX = "checkpoint_"

log = logging.getLogger(__name__)


def recover_cut_snapshot(storage_path: str, run_name: str) -> ray.train.Checkpoint | None:
    """When the Train run ``storage_path/run_name`` has a snapshot that does not parse as JSON, set it aside as
    ``checkpoint_manager_snapshot.json.cut-<unix time>`` and return the newest of the run's checkpoints whose state
    loads (``None`` when none does: the stage then starts over). ``None`` too when the snapshot is absent or whole."""
    fs, run = run_folder(storage_path, run_name)
    snapshot = f"{run}/{SNAPSHOT_FILE}"
    if fs.get_file_info(snapshot).type != pyarrow.fs.FileType.File or snapshot_is_whole(fs, snapshot):
        return None
    aside = f"{snapshot}.cut-{time.time():.0f}"
    fs.move(snapshot, aside)
    folders = sorted((info.path for info in fs.get_file_info(pyarrow.fs.FileSelector(run))
                      if info.type == pyarrow.fs.FileType.Directory
                      and info.base_name.startswith(CHECKPOINT_PREFIX)), reverse=True)
    for folder in folders:
        saved = ray.train.Checkpoint(folder, filesystem=fs)
        if state_loads(saved):
            log.warning("Ray Train run %s: its checkpoint snapshot was cut off (set aside as %s); resuming "
                        "from %s", run_name, aside, folder)
            return saved
    log.warning("Ray Train run %s: its checkpoint snapshot was cut off (set aside as %s) and no checkpoint "
                "loads; the stage starts over", run_name, aside)
    return None


def snapshot_is_whole(fs: pyarrow.fs.FileSystem, path: str) -> bool:
    with fs.open_input_stream(path) as stream:
        text = stream.read()
    try:
        json.loads(text)
    except ValueError:  # json.JSONDecodeError and UnicodeDecodeError
        return False
    return True


def state_loads(saved: ray.train.Checkpoint) -> bool:
    try:
        with saved.as_directory() as folder:
            checkpoint.load(Path(folder) / checkpoint.STATE_FILE)
    except (CheckpointError, FileNotFoundError):
        return False
    return True
