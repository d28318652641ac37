"""Where data files are read from: a local folder, or a file-system URI on shared storage that every node reads.

``data.root`` (and a table's ``data.options.path`` / ``test_path``) may be a local path or a URI that
:meth:`pyarrow.fs.FileSystem.from_uri` opens: ``file:///shared/data``, ``s3://bucket/data``, ``gs://bucket/data``,
``hdfs://namenode:8020/data``, ``abfs://container@account.dfs.core.windows.net/data`` (pyarrow ships the clients; HDFS
needs Java and ``libhdfs`` on every node). A local path stays a :class:`pathlib.Path`, read exactly as before; a URI
becomes a :class:`UriPath`, which answers the few :class:`~pathlib.Path` calls the data sets make (``/``, ``name``,
``is_file``, ``is_dir``, ``iterdir``, ``read_bytes``, ``open``). A file handed across processes (the images of an
``image_folder``, decoded in ``DataLoader`` workers on any node) is named by a string: the local path, or the file's
full URI, which :func:`read_bytes`, :func:`readable` and :func:`stat` open in whatever process holds it (each process
opens a URI's file system once). Options in a URI's query string (``?region=...``) apply to the data set's scan in
the driver; workers open each file's URI without them, so give such settings by the file system's environment
variables (``AWS_REGION`` ...) on every node.
"""

from __future__ import annotations

import functools
import io
import os
import posixpath
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Iterator
from urllib.parse import quote, unquote

from hpmkd.registry import ConfigError

#: ``scheme://``: what makes a data location a URI rather than a local path
URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_uri(location: str | Path | UriPath) -> bool:
    return isinstance(location, UriPath) or (isinstance(location, str) and URI.match(location) is not None)


@functools.lru_cache(maxsize=64)
def cached_filesystem(base_uri: str) -> tuple[Any, str]:
    """:meth:`pyarrow.fs.FileSystem.from_uri`, once per process for each ``scheme://authority/``."""
    from pyarrow.fs import FileSystem

    return FileSystem.from_uri(base_uri)


def filesystem(base_uri: str, key: str, uri: str) -> tuple[Any, str]:
    """``(pyarrow file system, its path of base_uri)``; a :class:`ConfigError` naming ``key`` and ``uri`` when no
    file system reads it (an unknown scheme) or its file system cannot be opened (its client missing, unreachable)."""
    from pyarrow import ArrowInvalid, ArrowNotImplementedError

    scheme = uri.split("://", 1)[0]
    try:
        return cached_filesystem(base_uri)
    except ArrowInvalid as err:
        raise ConfigError(f"{key}: {uri!r} is not a URI that a file system reads ({err}). Use a local folder, or a "
                          f"URI such as file:///shared/data, s3://bucket/data, gs://bucket/data, "
                          f"hdfs://namenode:8020/data or abfs://container@account.dfs.core.windows.net/data.") from None
    except (ArrowNotImplementedError, OSError) as err:
        raise ConfigError(f"{key}: the {scheme}:// file system of {uri!r} cannot be opened here ({err}). Install its "
                          f"client on every node (pyarrow built with {scheme} support; HDFS also needs Java and "
                          f"libhdfs: set JAVA_HOME / ARROW_LIBHDFS_DIR), check the address and credentials, or copy "
                          f"the data to a local folder and point {key} there.") from None


@dataclass(frozen=True)
class UriPath:
    """A file or folder on a pyarrow file system: the few :class:`~pathlib.Path` calls the data sets make."""

    base_uri: str  # ``scheme://authority/``: the file system's URI
    base: str  # what ``base_uri`` is in the file system's own paths (``""`` for a local or HDFS root, a bucket)
    path: str  # in the file system's own paths
    fs: Any = field(compare=False, repr=False)

    def at(self, path: str) -> UriPath:
        return UriPath(self.base_uri, self.base, path, self.fs)

    def __truediv__(self, name: str) -> UriPath:
        return self.at(posixpath.join(self.path, name)) if name else self

    def __str__(self) -> str:
        return self.base_uri + quote(self.path.removeprefix(self.base).lstrip("/"))

    @property
    def name(self) -> str:
        return posixpath.basename(self.path.rstrip("/"))

    def info(self) -> Any:
        return self.fs.get_file_info(self.path)

    def is_file(self) -> bool:
        from pyarrow.fs import FileType

        return self.info().type == FileType.File

    def is_dir(self) -> bool:
        from pyarrow.fs import FileType

        return self.info().type == FileType.Directory

    def iterdir(self) -> Iterator[UriPath]:
        from pyarrow.fs import FileSelector

        for info in self.fs.get_file_info(FileSelector(self.path)):
            yield self.at(info.path)

    def files(self) -> list[str]:
        """The URIs of every file under this folder, at any depth."""
        from pyarrow.fs import FileSelector, FileType

        return [str(self.at(i.path)) for i in self.fs.get_file_info(FileSelector(self.path, recursive=True))
                if i.type == FileType.File]

    def read_bytes(self) -> bytes:
        with self.fs.open_input_file(self.path) as f:  # random-access file: no decompression by extension
            return f.read()

    def open(self, mode: str = "rb") -> BinaryIO:
        if mode != "rb":
            raise ValueError(f"{self}: data files are read only (mode 'rb'), got {mode!r}.")
        return io.BytesIO(self.read_bytes())


def data_path(location: str, key: str = "data.root") -> Path | UriPath:
    """The local :class:`Path` (``~`` expanded) or the :class:`UriPath` that ``location`` names. A URI's file system
    is opened once per process for its ``scheme://authority/`` (and query), whichever of its files is asked for."""
    if not is_uri(location):
        return Path(location).expanduser()
    scheme, rest = location.split("://", 1)
    rest, _, query = rest.partition("?")
    authority, _, tail = rest.partition("/")
    base_uri = f"{scheme}://{authority}/"
    fs, base = filesystem(base_uri + (f"?{query}" if query else ""), key, location)
    base = base.rstrip("/")
    return UriPath(base_uri, base, f"{base}/{unquote(tail)}".rstrip("/") or "/", fs)


def as_path(location: str | Path | UriPath) -> Path | UriPath:
    return data_path(location) if isinstance(location, str) else location


def read_bytes(location: str | Path | UriPath) -> bytes:
    """The bytes of a file: a local path, a file URI, or a :class:`UriPath`."""
    return as_path(location).read_bytes()


def readable(location: str) -> str | BinaryIO:
    """What a reader that takes a path or a file object (PIL, pyarrow) is given: a local path itself, or the bytes
    of a URI's file in memory."""
    return io.BytesIO(read_bytes(location)) if is_uri(location) else location


def stat(location: str) -> tuple[int, int]:
    """``(size in bytes, modification time in ns)`` of a local path or a file URI."""
    if not is_uri(location):
        info = Path(location).stat()
        return info.st_size, info.st_mtime_ns
    info = as_path(location).info()
    return info.size, info.mtime_ns or 0


def walk_files(folder: Path | UriPath) -> list[str]:
    """The files under ``folder`` at any depth (local paths or URIs), unsorted."""
    if isinstance(folder, UriPath):
        return folder.files()
    return [str(Path(d) / f) for d, _, files in os.walk(folder) for f in files]


def arrow_input(location: Path | UriPath, *, stream: bool) -> Any:
    """What a pyarrow reader is given: a local path itself; for a URI, its file opened on its file system, as a
    stream decompressed by extension (``.gz``: for CSV, as pyarrow does for a local path) or as a random-access file
    (Parquet)."""
    if isinstance(location, Path):
        return location
    return location.fs.open_input_stream(location.path) if stream else location.fs.open_input_file(location.path)


def check_location(location: str | None, key: str) -> None:
    """A URI's file system must open before anything trains (:func:`filesystem` says what is wrong)."""
    if isinstance(location, str) and is_uri(location):
        data_path(location, key)
