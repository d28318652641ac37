"""A stage's per-epoch checkpoints when it runs without Ray Train (the ``task`` executor,
:mod:`hpmkd.components.task_executor`): ``<ray.storage_path>/<run>/epoch_<k>/state.pt``.

:meth:`EpochCheckpoints.save` writes the state to a local temporary file (:func:`hpmkd.checkpoint.save_atomic`),
copies it (with a ``run_id`` file naming the MLflow run that saved it) to ``<run>/.partial-epoch_<k>``, renames that folder to ``epoch_<k>``, then deletes every other epoch folder:
like Ray Train's ``CheckpointConfig(num_to_keep=1)``, one checkpoint is kept, and the previous one goes only once the
new one is whole. :meth:`EpochCheckpoints.latest` is the newest ``epoch_<k>`` whose ``state.pt`` loads, so a folder
cut off mid-copy (a worker killed on an object store where a rename is a copy) is passed over and the one before it
used. Storage is any pyarrow file system (a local or shared folder, ``s3://``, ``gs://``...), like Ray Train's.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs

from hpmkd import checkpoint
from hpmkd.checkpoint import CheckpointError
from hpmkd.data.storage import is_uri

#: the prefix of a finished epoch's folder; the epoch is zero-padded so the names sort by epoch
EPOCH_PREFIX = "epoch_"
#: the prefix of a folder still being copied
PARTIAL_PREFIX = ".partial-"
#: the file naming the MLflow run that saved a checkpoint
OWNER_FILE = "run_id"


@dataclass
class Saved:
    """A loaded checkpoint: its state, and the MLflow run that saved it (``""``: none)."""

    state: dict[str, Any]
    owner: str


def run_folder(storage_path: str, run_name: str) -> tuple[pyarrow.fs.FileSystem, str]:
    """The file system of ``storage_path`` (a local folder or a URI) and the path of ``run_name``'s folder in it."""
    location = storage_path if is_uri(storage_path) else str(Path(storage_path).resolve())
    fs, root = pyarrow.fs.FileSystem.from_uri(location)
    return fs, f"{root.rstrip('/')}/{run_name}"


class EpochCheckpoints:
    """The checkpoints of one run: ``save`` after each epoch, ``latest`` to resume."""

    def __init__(self, storage_path: str, run_name: str):
        self.fs, self.run = run_folder(storage_path, run_name)

    def save(self, epoch: int, state: dict[str, Any], owner: str = "") -> None:
        name = f"{EPOCH_PREFIX}{epoch:06d}"
        partial, final = f"{self.run}/{PARTIAL_PREFIX}{name}", f"{self.run}/{name}"
        with tempfile.TemporaryDirectory() as local:
            checkpoint.save_atomic(state, Path(local) / checkpoint.STATE_FILE)
            (Path(local) / OWNER_FILE).write_text(owner)
            self.fs.delete_dir_contents(partial, missing_dir_ok=True)
            self.fs.create_dir(partial, recursive=True)
            pyarrow.fs.copy_files(local, partial, source_filesystem=pyarrow.fs.LocalFileSystem(),
                                  destination_filesystem=self.fs)
        if self.fs.get_file_info(final).type == pyarrow.fs.FileType.Directory:
            self.fs.delete_dir(final)  # the same epoch trained again after a restart
        self.fs.move(partial, final)
        for other in self.folders():
            if other != final:
                self.fs.delete_dir(other)

    def latest(self) -> Saved | None:
        """The newest checkpoint that loads, or ``None`` (nothing saved yet: start from scratch)."""
        for folder in self.folders():
            with tempfile.TemporaryDirectory() as local:
                try:
                    pyarrow.fs.copy_files(folder, local, source_filesystem=self.fs,
                                          destination_filesystem=pyarrow.fs.LocalFileSystem())
                    return Saved(checkpoint.load(Path(local) / checkpoint.STATE_FILE),
                                 (Path(local) / OWNER_FILE).read_text())
                except (CheckpointError, OSError):  # cut off mid-copy, or gone
                    continue
        return None

    def folders(self) -> list[str]:
        """The finished epoch folders, newest first."""
        if self.fs.get_file_info(self.run).type != pyarrow.fs.FileType.Directory:
            return []
        found = [info.path for info in self.fs.get_file_info(pyarrow.fs.FileSelector(self.run))
                 if info.type == pyarrow.fs.FileType.Directory and info.base_name.startswith(EPOCH_PREFIX)]
        return sorted(found, reverse=True)
