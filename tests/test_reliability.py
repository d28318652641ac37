"""What hpmkd guarantees under bad input, faults and concurrency (docs/reliability.md), one section per class:

1. validation complete before anything starts; 2. one error path (``hpmkd: error: ...``, exit code 2);
3. files and paths that cannot hurt; 4. a logit cache that verifies; 5. runs that share a store;
6. Ray on loopback with token authentication.

Each class is walked through the real ``hpmkd`` command, as a user would meet it: the bad file is written, ``hpmkd``
runs as a subprocess, and the test asserts the exit code, the one-line message (naming the key, file or fix) and
that nothing was trained or written. Those walks start the command dozens of times, so they are marked
``integration``; the building blocks have unit tests here too.
"""

from __future__ import annotations

import dataclasses
import gzip
import ipaddress
import json
import os
import pickle
import secrets
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
import yaml
from mlflow import MlflowClient

from hpmkd.components import claims, orphans
from hpmkd.components.tracking import Tracker, sqlite_file
from hpmkd.config import config_from_data
from hpmkd.data import load_dataset
from hpmkd.data.cifar import CifarFormatError
from hpmkd.logit_cache import (CacheEntryError, CacheKey, CachedLogits, clear, entry_path, list_entries, lookup,
                               write_entry)
from hpmkd.paths import UnsafePathError, inside, safe_name
from hpmkd.registry import ConfigError
from hpmkd.safe_yaml import MAX_BYTES, load_yaml

ROOT = Path(__file__).resolve().parent.parent
SYSTEM_FMNIST = Path("/usr/share/datasets/fashion-mnist")

#: a tiny experiment on scikit-learn's digits: a 32-unit MLP teacher, an 8-unit MLP student, one epoch each
BASE = {
    "experiment": "reliability",
    "pipeline": "kd",
    "data": {"name": "digits", "max_train": 300, "max_val": 100, "max_test": 100},
    "teachers": [{"name": "t", "model": "mlp", "options": {"hidden": 32}}],
    "student": {"model": "mlp", "options": {"hidden": 8}},
    "train": {"epochs": 1, "batch_size": 64},
    "distill": {"ce_weight": 0.1, "methods": {"kd": {"weight": 0.9}}, "aggregator": {"name": "mean_logits"},
                "temperature": {"schedule": "fixed", "T": 4.0}, "baseline": False},
    "mlflow": {"log_models": False},
}


# ----------------------------------------------------------------------------------------------------------- helpers

def config(**changes) -> dict:
    """:data:`BASE` with top-level sections replaced or updated (a dict value updates a dict section)."""
    data = json.loads(json.dumps(BASE))
    for key, value in changes.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) and isinstance(data.get(key), dict) else value
    return data


def write(folder: Path, data: dict | str, name: str = "exp.yaml") -> Path:
    path = folder / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def hpmkd(cwd: Path, *args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hpmkd.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


def refused(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """The command ended as a user error: exit code 2, no traceback, and its last line is ``hpmkd: error: ...`` with
    every fragment in it."""
    assert result.returncode == 2, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("hpmkd: error: "), result.stderr
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in {line!r}"
    return line


def files_in(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def idx(array: np.ndarray) -> bytes:
    """An uint8 IDX file (magic 0x00 0x00 0x08 <ndim>, big-endian dims, values)."""
    return bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape) + array.tobytes()


def fake_fashion(folder: Path, train_labels: np.ndarray | None = None) -> Path:
    """Four small Fashion-MNIST IDX files (gzip) in ``folder``; ``train_labels`` replaces the training labels."""
    rng = np.random.default_rng(0)
    labels = (np.arange(60) % 10).astype(np.uint8) if train_labels is None else train_labels.astype(np.uint8)
    arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, (len(labels), 28, 28), dtype=np.uint8),
              "train-labels-idx1-ubyte": labels,
              "t10k-images-idx3-ubyte": rng.integers(0, 256, (20, 28, 28), dtype=np.uint8),
              "t10k-labels-idx1-ubyte": (np.arange(20) % 10).astype(np.uint8)}
    folder.mkdir(parents=True, exist_ok=True)
    for stem, array in arrays.items():
        (folder / f"{stem}.gz").write_bytes(gzip.compress(idx(array)))
    return folder


def nothing_written(folder: Path, before: set[str]) -> None:
    """No MLflow store, no output folder, no cache: the folder holds what the test put there and nothing else."""
    assert files_in(folder) == before, sorted(files_in(folder) - before)


# --------------------------------------------------------------------- 1. validation complete before anything starts

def meta_hpmkd(**extra) -> dict:
    """An ``hpmkd`` pipeline on digits with the configuration manager on and no search space written."""
    manager = {"enabled": True, "trials": 2, "proposals": 1, "budget_epochs": 1, **extra}
    return config(pipeline="hpmkd", config_manager=manager,
                  chain={"assistants": []},
                  distill={"aggregator": {"name": "attention"},
                           "temperature": {"schedule": "meta", "T": 4.0, "T_min": 3.0, "T_max": 5.0}})


def labels_out_of_range(tmp: Path) -> dict:
    fake_fashion(tmp / "fm", np.array([*range(10)] * 5 + [12] * 3 + [0] * 7))
    return config(data={"name": "fashion_mnist", "root": str(tmp / "fm"), "max_train": None, "max_val": None,
                        "max_test": None})


BAD_VALUES = {  # case -> (config written to the file, fragments of the one-line error)
    "model option typo": (lambda tmp: config(student={"model": "mlp", "options": {"hiden": 8}}),
                          ["student.options.hiden", "Did you mean 'hidden'"]),
    "model option value": (lambda tmp: config(teachers=[{"name": "t", "model": "mlp", "options": {"hidden": -3}}]),
                           ["teachers.0", "hidden must be > 0"]),
    "torchvision builder option": (
        lambda tmp: config(teachers=[{"name": "t", "model": "resnet18", "options": {"widht": 2}}]),
        ["teachers.0", "resnet18", "widht"]),
    "temperature 0": (lambda tmp: config(distill={"temperature": {"schedule": "fixed", "T": 0}}),
                      ["distill.temperature", "T must be a positive number"]),
    "temperature NaN": (lambda tmp: config(distill={"temperature": {"schedule": "fixed", "T": float("nan")}}),
                        ["distill.temperature.T: must be a finite number"]),
    "temperature string": (lambda tmp: config(distill={"temperature": {"schedule": "fixed", "T": "hot"}}),
                           ["distill.temperature.T: expected float, got str 'hot'"]),
    "negative method weight": (lambda tmp: config(distill={"methods": {"kd": {"weight": -0.5}}}),
                               ["distill.methods.kd.weight: must be >= 0"]),
    "NaN method weight": (lambda tmp: config(distill={"methods": {"kd": {"weight": float("nan")}}}),
                          ["distill.methods.kd.weight: must be a finite number"]),
    "all-zero loss weights": (lambda tmp: config(distill={"ce_weight": 0, "methods": {"kd": {"weight": 0}}}),
                              ["distill.methods", "every loss weight is 0"]),
    "infinite learning rate": (lambda tmp: config(train={"lr": float("inf")}), ["train.lr: must be a finite number"]),
    "aggregator option value": (lambda tmp: config(distill={"aggregator": {"name": "attention", "hidden": 0}}),
                                ["distill.aggregator", "hidden"]),
    "search space for a schedule without T": (
        lambda tmp: {**meta_hpmkd(), "distill": {**meta_hpmkd()["distill"], "temperature": {"schedule": "cosine"}}},
        ["config_manager.search_space.T", "cosine"]),
    "labels outside [0, num_classes)": (labels_out_of_range, ["label(s) outside [0, 10)", "values 12"]),
    "negative seed": (lambda tmp: config(seed=-1), ["seed: must be in [0, 2**32)"]),
}


@pytest.mark.integration
@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_hpmkd_run_refuses_bad_values_before_anything_starts(tmp_path, case):
    make, fragments = BAD_VALUES[case]
    path = write(tmp_path, make(tmp_path))
    before = files_in(tmp_path)
    refused(hpmkd(tmp_path, "run", str(path)), *fragments)
    nothing_written(tmp_path, before)


BAD_YAML = {  # case -> (the file's text, fragments)
    "duplicate key": (yaml.safe_dump(BASE, sort_keys=False) + "pipeline: hpmkd\n",
                      ["exp.yaml: line", "key 'pipeline' appears twice (first on line 2)"]),
    "alias expansion": ("a: &a [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
                        "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]\n",
                        ["exp.yaml: line 4: expands to more than 10000 values"]),
    "recursive alias": ("a: &a [1, *a]\n", ["an alias refers to a node that contains it"]),
    "10 MB document": ("x: [" + "1, " * (5 << 20) + "1]\n", [f"more than the {MAX_BYTES} a config may have"]),
    "invalid YAML": ("experiment: [unclosed\n", ["exp.yaml: not valid YAML at line"]),
    "python object tag": ("experiment: !!python/object/apply:os.system [touch pwned]\n", ["not valid YAML"]),
}


@pytest.mark.integration
@pytest.mark.parametrize("case", list(BAD_YAML))
def test_hpmkd_run_refuses_surprising_yaml(tmp_path, case):
    text, fragments = BAD_YAML[case]
    path = write(tmp_path, text)
    before = files_in(tmp_path)
    refused(hpmkd(tmp_path, "run", str(path)), *fragments)
    nothing_written(tmp_path, before)


@pytest.mark.integration
def test_yaml_12_numbers_are_numbers_and_a_narrowed_search_range_is_said(tmp_path):
    text = yaml.safe_dump(config(train={"lr": 0.05}), sort_keys=False)
    text = text.replace("lr: 0.05", "lr: 5e-2\n  weight_decay: 1e-4")
    ok = hpmkd(tmp_path, "validate", str(write(tmp_path, text)))
    assert ok.returncode == 0 and ok.stdout.startswith("OK "), ok.stderr  # YAML 1.1 read both as strings
    train = config_from_data(load_yaml(text, "exp.yaml")).train
    assert (train.lr, train.weight_decay) == (0.05, 1e-4)
    narrowed = hpmkd(tmp_path, "validate", str(write(tmp_path, meta_hpmkd(), "hpmkd.yaml")))
    assert narrowed.returncode == 0, narrowed.stderr
    assert ("config_manager.search_space.T: default range [1.0, 8.0] narrowed to [3.002, 4.998] by the recipe"
            in narrowed.stderr)


def test_yaml_loader_unit():
    assert load_yaml("a: 1e6\nb: 5e-4\nc: -2E+3\nd: 1.5e3\ne: 1_000\nf: abc\ng: '1e3'\n", "t") == {
        "a": 1e6, "b": 5e-4, "c": -2000.0, "d": 1500.0, "e": 1000, "f": "abc", "g": "1e3"}
    assert load_yaml("base: &b {x: 1, y: 2}\nc:\n  <<: *b\n  x: 3\n", "t")["c"] == {"x": 3, "y": 2}  # merges override
    with pytest.raises(ConfigError, match=r"t: line 3: key 'a' appears twice \(first on line 1\)"):
        load_yaml("a: 1\nb: 2\na: 3\n", "t")
    with pytest.raises(ConfigError, match="nested more than 64 levels"):
        load_yaml("[" * 70 + "]" * 70, "t")


def test_registry_options_are_typed_and_finite():
    base = config()
    def error(**changes) -> str:
        with pytest.raises(ConfigError) as info:
            config_from_data(config(**changes))
        return str(info.value)
    assert error(student={"model": "mlp", "options": {"hidden": "wide"}}) == \
        "student.options.hidden: expected int, got str 'wide'."
    assert error(distill={"temperature": {"schedule": "meta", "T_max": float("inf")}}) == \
        "distill.temperature.T_max: must be a finite number, got inf."
    assert "train.lr: expected float, got the string '1e-3'; write it without quotes" in error(train={"lr": "1e-3"})
    assert error(train={"momentum": 1.0}) == "train.momentum: must be in [0, 1), got 1.0."
    assert "teachers.0.name: 'a/b'" in error(teachers=[{"name": "a/b", "model": "mlp"}])
    assert "experiment: '' is not a usable name" in error(experiment="")
    assert config_from_data(base).distill.methods == {"kd": {"weight": 0.9}}


def test_labels_are_checked_when_the_data_load(tmp_path):
    fake_fashion(tmp_path / "ok")
    assert load_dataset("fashion_mnist", root=str(tmp_path / "ok")).num_classes == 10
    fake_fashion(tmp_path / "bad", np.array([*range(10)] * 6 + [10]))
    with pytest.raises(ValueError, match=r"1 training label\(s\) outside \[0, 10\) \(values 10\)"):
        load_dataset("fashion_mnist", root=str(tmp_path / "bad"))


# ---------------------------------------------------------------------------------------------- 2. one error path

def teacher_file(tmp: Path, content: bytes) -> list[str]:
    path = tmp / "teacher.pt"
    path.write_bytes(content)
    return ["run", str(write(tmp, config(teachers=[{"name": "t", "model": "mlp", "options": {"hidden": 32},
                                                    "checkpoint": str(path)}])))]


def truncated_idx(tmp: Path) -> list[str]:
    folder = fake_fashion(tmp / "fm")
    data = (folder / "train-images-idx3-ubyte.gz").read_bytes()
    (folder / "train-images-idx3-ubyte.gz").write_bytes(data[: len(data) // 2])
    return ["run", str(write(tmp, config(data={"name": "fashion_mnist", "root": str(folder), "max_train": None,
                                               "max_val": None, "max_test": None})))]


def cache_folder(tmp: Path) -> Path:
    (tmp / "cache").mkdir()
    return tmp / "cache"


ERRORS = {  # case -> (arguments, given a scratch folder; fragments)
    "teacher checkpoint that is text": (lambda tmp: teacher_file(tmp, b"just some notes\n"),
                                        ["teachers.0.checkpoint", "teacher.pt: cannot be read as a checkpoint"]),
    "teacher checkpoint that is YAML": (lambda tmp: teacher_file(tmp, b"model: mlp\nweights: [1, 2]\n"),
                                        ["teachers.0.checkpoint", "Give a model.pt or state.pt written by hpmkd"]),
    "empty teacher checkpoint": (lambda tmp: teacher_file(tmp, b""), ["teachers.0.checkpoint", "empty, truncated"]),
    "teacher checkpoint that runs code": (
        lambda tmp: teacher_file(tmp, pickle.dumps(Exploit(str(tmp / "pwned")))),
        ["teachers.0.checkpoint", "loading them could run code"]),
    "truncated .gz IDX file": (truncated_idx, ["train-images-idx3-ubyte.gz: the gzip stream is truncated or corrupt"]),
    "invalid YAML after --set": (lambda tmp: ["run", str(write(tmp, config())), "--set", "train.lr=[0.1"],
                                 ["--set train.lr: not valid YAML"]),
    "empty experiment name": (lambda tmp: ["run", str(write(tmp, config(experiment="")))],
                              ["experiment: '' is not a usable name"]),
    "missing config": (lambda tmp: ["validate", str(tmp / "nope.yaml")], ["config file", "does not exist"]),
    "unknown store scheme": (lambda tmp: ["run", str(write(tmp, config())), "--tracking-uri", "nosuch://store"],
                             ["MLflow store 'nosuch://store' cannot be opened", "--tracking-uri"]),
    "report on a missing store": (lambda tmp: ["report", "--tracking-uri", f"sqlite:///{tmp / 'none.db'}"],
                                  ["no MLflow store at"]),
    "ui on an unknown store": (lambda tmp: ["ui", "--tracking-uri", "nosuch://store"], ["cannot be opened"]),
    "ui port": (lambda tmp: ["ui", "--port", "70000"], ["argument --port: '70000' is not a port number",
                                                          "see `hpmkd ui --help`"]),
    "cache age": (lambda tmp: ["cache", "clear", "--dir", str(cache_folder(tmp)), "--older-than", "3x"],
                  ["--older-than '3x'", "e.g. 30m, 12h or 7d"]),
    "cache folder": (lambda tmp: ["cache", "list", "--dir", str(tmp / "nocache")], ["nocache: no such folder"]),
    "ablate seeds": (lambda tmp: ["ablate", str(write(tmp, config())), "--seeds", "0"], ["--seeds"]),
    "missing data root": (lambda tmp: ["run", str(write(tmp, config(data={"root": str(tmp / "gone")})))],
                          ["data.root: folder", "does not exist"]),
}


class Exploit:
    """Unpickling this creates a file: what a hostile checkpoint or data file would do."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


@pytest.mark.integration
@pytest.mark.parametrize("case", list(ERRORS))
def test_every_command_ends_a_user_error_in_one_line(tmp_path, case):
    make, fragments = ERRORS[case]
    args = make(tmp_path)
    before = files_in(tmp_path)
    refused(hpmkd(tmp_path, *args), *fragments)
    nothing_written(tmp_path, before)


@pytest.mark.integration
def test_debug_shows_the_traceback_and_cache_list_ignores_foreign_files(tmp_path):
    args = ["run", str(write(tmp_path, config(train={"lr": float("inf")})))]
    assert "Traceback" not in hpmkd(tmp_path, *args).stderr
    debug = hpmkd(tmp_path, "--debug", *args)
    assert debug.returncode == 2 and "Traceback" in debug.stderr and "ConfigError" in debug.stderr
    assert debug.stderr.strip().splitlines()[-1].startswith("hpmkd: error: train.lr")
    assert "Traceback" in hpmkd(tmp_path, *args, "--debug").stderr  # after the command as well
    folder = cache_folder(tmp_path)
    write_entry(folder, KEY, logits())
    (folder / "results.arrow").write_bytes(b"ARROW1 not ours")
    (folder / "notes.txt").write_text("mine")
    listed = hpmkd(tmp_path, "cache", "list", "--dir", str(folder))
    assert listed.returncode == 0 and "1 entries" in listed.stdout and "Traceback" not in listed.stderr


# ------------------------------------------------------------------------------------------ 3. safe by construction

def cifar_folder(root: Path, hostile: Path | None = None) -> Path:
    """A small CIFAR-10 folder as torchvision writes it (protocol-2 pickles naming ``numpy.core``, as the originals
    do); with ``hostile``, ``data_batch_1`` is a pickle that would create that file."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (10, 3072), dtype=np.uint8), "labels": [i % 10 for i in range(10)]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2).replace(b"numpy._core", b"numpy.core"))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}, protocol=2))
    if hostile is not None:
        (folder / "data_batch_1").write_bytes(pickle.dumps({"data": Exploit(str(hostile)), "labels": [0]}))
    return folder


def test_cifar_batches_are_read_without_running_code(tmp_path):
    cifar_folder(tmp_path / "good")
    splits = load_dataset("cifar10", root=str(tmp_path / "good"), val_fraction=0.2)
    assert splits.num_classes == 10 and splits.input_shape == (3, 32, 32) and len(splits.test) == 10
    folder = cifar_folder(tmp_path / "bad", hostile=tmp_path / "pwned")
    with pytest.raises(CifarFormatError, match=r"data_batch_1: not a CIFAR batch \(it refers to \w+\.open"):
        load_dataset("cifar10", root=str(tmp_path / "bad"))
    assert not (tmp_path / "pwned").exists()
    (folder / "data_batch_1").write_bytes(pickle.dumps({"data": np.zeros((2, 5)), "labels": [0, 1]}))
    with pytest.raises(CifarFormatError, match=r"'data' must be a uint8 array \[N, 3072\]"):
        load_dataset("cifar10", root=str(tmp_path / "bad"))


@pytest.mark.integration
def test_hpmkd_run_on_a_crafted_cifar_folder_creates_nothing(tmp_path):
    cifar_folder(tmp_path / "data", hostile=tmp_path / "pwned")
    path = write(tmp_path, config(data={"name": "cifar10", "root": str(tmp_path / "data")}))
    before = files_in(tmp_path)
    refused(hpmkd(tmp_path, "run", str(path)), "data_batch_1: not a CIFAR batch", "restricted unpickler")
    assert not (tmp_path / "pwned").exists()
    nothing_written(tmp_path, before)


@pytest.mark.integration
@pytest.mark.skipif(not (SYSTEM_FMNIST / "train-images-idx3-ubyte.gz").is_file(), reason="needs the system copy")
def test_a_given_data_root_never_falls_back_to_the_system_copy(tmp_path):
    (tmp_path / "empty").mkdir()
    path = write(tmp_path, config(data={"name": "fashion_mnist", "root": str(tmp_path / "empty")}))
    before = files_in(tmp_path)
    line = refused(hpmkd(tmp_path, "run", str(path)), f"searched data.root {str(tmp_path / 'empty')!r}",
                   "point data.root at the folder that holds the four files")
    assert str(SYSTEM_FMNIST) not in line
    nothing_written(tmp_path, before)
    refused(hpmkd(tmp_path, "run", str(write(tmp_path, config(data={"name": "fashion_mnist", "root": ""})))),
            "data.root: empty")


@pytest.mark.integration
def test_cache_clear_removes_only_the_caches_own_files(tmp_path):
    folder = cache_folder(tmp_path)
    ours = [write_entry(folder, KEY, logits()), write_entry(folder, dataclasses.replace(KEY, split="val"), logits())]
    leftover = folder / f".{ours[0].name}.tmp-123"
    leftover.write_bytes(ours[0].read_bytes())
    theirs = [folder / "results.arrow", folder / "notes.txt", folder / f"{'ab' * 12}.arrow",
              folder / f"{'cd' * 12}.arrow"]
    theirs[0].write_bytes(ours[0].read_bytes())  # an Arrow file under a name the cache never gives
    theirs[1].write_text("notes")
    theirs[2].write_text("a text file under an entry's name")  # no Arrow magic
    with pa.OSFile(str(theirs[3]), "wb") as sink, pa.ipc.new_file(sink, pa.schema([("x", pa.int8())])) as w:
        w.write_table(pa.table({"x": pa.array([1], pa.int8())}))  # an Arrow file without the cache's marker
    cleared = hpmkd(tmp_path, "cache", "clear", "--dir", str(folder))
    assert cleared.returncode == 0 and "removed 3 files" in cleared.stdout, cleared.stderr
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in theirs)


def test_names_become_safe_file_names_inside_their_root(tmp_path):
    assert safe_name("fashion-mnist_kd.v2") == "fashion-mnist_kd.v2"  # plain names are kept
    for name in ("../../x", "/etc/passwd", "..", ".hidden", "a b", "", "x" * 300, "é"):
        safe = safe_name(name)
        assert "/" not in safe and not safe.startswith(".") and 0 < len(safe) <= 64
        assert inside(tmp_path, safe).parent == tmp_path.resolve()
    assert safe_name("a b") != safe_name("a-b") and safe_name("../x") != safe_name("./x")
    (tmp_path / "link").symlink_to("/")
    with pytest.raises(UnsafePathError, match="outside"):
        inside(tmp_path, "link", "etc")


# ------------------------------------------------------------------------------------------ 4. a cache that verifies

KEY = CacheKey(weights="w" * 64, model="mlp", data="fp", split="train", view="plain", dtype="float32")


def logits(n: int = 50, c: int = 10) -> np.ndarray:
    return np.random.default_rng(0).normal(size=(n, c)).astype(np.float32)


def flip_a_bit(path: Path, z: np.ndarray) -> None:
    """Flip one bit inside the stored values (found by their bytes), keeping the file's size."""
    data = bytearray(path.read_bytes())
    at = bytes(data).index(z.tobytes()[:64]) + 100
    data[at] ^= 0x10
    path.write_bytes(bytes(data))


def test_a_damaged_entry_is_named_moved_aside_and_missed(tmp_path):
    z = logits()
    path = write_entry(tmp_path, KEY, z)
    flip_a_bit(path, z)
    with pytest.raises(CacheEntryError, match=f"{path.name}: column 'logits' fails its checksum"):
        CachedLogits(path)
    [listed] = list(list_entries(tmp_path))
    assert listed.key is None and "fails its checksum" in listed.problem
    assert lookup(tmp_path, KEY) is None  # moved aside: the caller recomputes it
    [aside] = [p for p in tmp_path.iterdir() if ".corrupt-" in p.name]
    assert aside.name.startswith(f".{path.name}.corrupt-") and not path.exists()
    write_entry(tmp_path, KEY, z)
    np.testing.assert_array_equal(lookup(tmp_path, KEY).rows(torch.arange(50)).numpy(), z)
    truncated = entry_path(tmp_path, KEY)
    truncated.write_bytes(truncated.read_bytes()[:-200])
    with pytest.raises(CacheEntryError, match="unreadable .* truncated or corrupt"):
        CachedLogits(truncated)
    assert clear(tmp_path) and list(tmp_path.iterdir()) == []  # moved-aside and damaged entries are the cache's


@pytest.mark.integration
def test_cache_list_reports_a_damaged_entry_instead_of_failing(tmp_path):
    z = logits()
    flip_a_bit(write_entry(tmp_path, KEY, z), z)
    listed = hpmkd(tmp_path, "cache", "list", "--dir", str(tmp_path))
    assert listed.returncode == 0, listed.stderr
    assert "DAMAGED" in listed.stdout and "fails its checksum" in listed.stdout
    assert "1 entries (1 damaged)" in listed.stdout


# ----------------------------------------------------------------------------------- 5. runs that share one store

#: a driver's first step: open the store (created if new) and its experiment, once every process is ready
CREATE = """
import sys, time
from pathlib import Path
from hpmkd.components.tracking import Tracker
uri, ready, n = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
(ready / sys.argv[4]).touch()
while len(list(ready.iterdir())) < n:
    time.sleep(0.005)
print(Tracker(uri, "shared").experiment_id)
"""


def test_first_runs_create_a_new_sqlite_store_safely_at_once(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    (tmp_path / "ready").mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", CREATE, uri, str(tmp_path / "ready"), "3", str(i)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(3)]
    outs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err[-2000:] for _, err in outs]
    assert len({out.strip() for out, _ in outs}) == 1  # one experiment, found or created by each
    import sqlite3

    assert sqlite3.connect(sqlite_file(uri)).execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_a_claimed_stage_key_waits_for_its_holder_and_reuses_it(tracking_uri, monkeypatch):
    monkeypatch.setattr(claims, "POLL_S", 0.1)
    tracker = Tracker(tracking_uri, "claims")
    driver = {orphans.DRIVER_TAG: orphans.this_driver()}
    first_parent = tracker.start_run("one", {"kind": "pipeline", **driver})
    second_parent = tracker.start_run("two", {"kind": "pipeline", **driver})
    holder = tracker.start_run("stage", {"stage_key": "k1"}, first_parent)
    time.sleep(0.01)  # created first: the claim orders by creation time
    waiter = tracker.start_run("stage", {"stage_key": "k1"}, second_parent)
    assert claims.claim(tracker, "k1", holder) is None  # created first: it computes
    got: list = []
    thread = threading.Thread(target=lambda: got.append(claims.claim(tracker, "k1", waiter)))
    thread.start()
    time.sleep(1.0)
    assert thread.is_alive() and not got  # still waiting while the holder runs
    tracker.finish(holder)
    thread.join(timeout=30)
    assert got == [holder]  # then it reuses the holder's run
    assert tracker.client.get_run(waiter).data.tags["waited_for"] == holder
    dead_parent = tracker.start_run("dead", {"kind": "pipeline", orphans.DRIVER_TAG: "nohost:1:1"})
    stale = tracker.start_run("stage", {"stage_key": "k2"}, dead_parent)
    tracker.set_tags(stale, {claims.RESUME_TAG: "k2-stale"})
    mine = tracker.start_run("stage", {"stage_key": "k2"}, second_parent)
    assert claims.claim(tracker, "k2", mine) is None  # a dead driver's run holds nothing
    assert claims.interrupted(tracker, "k2", mine) == "k2-stale"  # and its folder is resumed


@pytest.fixture(scope="module")
def shared_store(ray_session, tmp_path_factory):
    """Two `hpmkd run` drivers started at once on one config and one new store (both joining the session's Ray);
    the experiment name is hostile (``../``, a space) to check that every file stays inside the output folder."""
    tmp = tmp_path_factory.mktemp("shared")
    address = ray_session.get_runtime_context().gcs_address
    cfg = config(experiment="../../outside/x y", ray={"address": address}, output_dir=str(tmp / "runs"))
    path = write(tmp, cfg)
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    outside = set(os.listdir(tmp.parent))
    drivers = [subprocess.Popen([sys.executable, "-m", "hpmkd.cli", "run", str(path), "--tracking-uri", uri],
                                cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    logs = [d.communicate(timeout=600)[0] for d in drivers]
    return tmp, path, uri, [d.returncode for d in drivers], logs, outside


@pytest.mark.integration
def test_two_concurrent_runs_share_a_new_store_and_train_each_stage_once(shared_store):
    tmp, _, uri, codes, logs, outside = shared_store
    assert codes == [0, 0], logs
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("../../outside/x y")
    stages = client.search_runs([experiment.experiment_id], "tags.kind = 'stage'")
    assert len(stages) == 4 and all(r.info.status == "FINISHED" for r in stages)
    for name in ("teacher_t", "distill"):
        runs = [r for r in stages if r.data.tags["stage"] == name]
        computed = [r for r in runs if r.data.tags.get("reused") != "true"]
        assert len(runs) == 2 and len(computed) == 1, name  # trained once, reused once
        reuser = next(r for r in runs if r.data.tags.get("reused") == "true")
        assert reuser.data.tags["reused_from"] == computed[0].info.run_id
    folders = sorted(p.name for p in (tmp / "runs" / "ray").iterdir())
    assert len(folders) == 2 and all(f.startswith(f"{safe_name('../../outside/x y')}-") for f in folders)
    assert all(any(r.info.run_id in f for f in folders) for r in stages if r.data.tags.get("reused") != "true")
    assert set(os.listdir(tmp.parent)) == outside  # nothing written next to the test's folder
    assert {p.name for p in (tmp / "runs").iterdir()} == {safe_name("../../outside/x y"), "ray", "logit_cache",
                                                        "hpmkd.log"}  # both runs' Ray and MLflow messages


@pytest.mark.integration
def test_a_bit_flipped_cache_entry_is_recomputed_by_the_next_run(shared_store):
    tmp, path, uri, codes, _, _ = shared_store
    assert codes == [0, 0]
    [entry] = list((tmp / "runs" / "logit_cache").glob("*.arrow"))
    stored = CachedLogits(entry).rows(torch.arange(10)).numpy()
    flip_a_bit(entry, stored.astype(np.float16))
    # the distillation changes (one more epoch): its stage runs again and needs the teacher's logits; the teacher
    # stage is reused, so the same entry is looked up
    rerun = hpmkd(tmp, "run", str(path), "--tracking-uri", uri, "--set", "distill.train={epochs: 2}", timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"{entry}" in rerun.stderr and "moved aside" in rerun.stderr
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("../../outside/x y")
    [distill] = client.search_runs([experiment.experiment_id], "tags.stage = 'distill'", max_results=1,
                                   order_by=["attributes.start_time DESC"])
    assert distill.data.metrics["cache_hits"] == 0 and distill.data.metrics["cache_entries"] == 1
    np.testing.assert_array_equal(CachedLogits(entry).rows(torch.arange(10)).numpy(), stored)  # recomputed exactly
    assert len(list(entry.parent.glob(f".{entry.name}.corrupt-*"))) == 1


# --------------------------------------------------------------------------- 6. Ray on loopback, token auth on

def descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def listening(pids: set[int]) -> list[tuple[int, str]]:
    """``(pid, address)`` of every listening TCP socket of ``pids`` (from /proc/net/tcp{,6} and /proc/<pid>/fd)."""
    owner = {}
    for pid in pids:
        try:
            links = [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]
        except OSError:
            continue
        owner.update({int(link[8:-1]): pid for link in links if link.startswith("socket:[")})
    found = []
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A" or int(fields[9]) not in owner:  # 0A: LISTEN
                continue
            raw = bytes.fromhex(fields[1].split(":")[0])
            words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # each 32-bit word is host-order
            found.append((owner[int(fields[9])], str(ipaddress.ip_address(words))))
    return found


def loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return ip.is_loopback or (ip.version == 6 and ip.ipv4_mapped is not None and ip.ipv4_mapped.is_loopback)


def test_ray_processes_inherit_the_settings_and_the_job_has_no_runtime_env(ray_session):
    """hpmkd's Ray settings reach every Ray process through the environment, not as the job's runtime env: with one,
    Ray would start a new process for each task instead of using the pooled ones that ray.init started."""
    from hpmkd.components.ray_runtime import RAY_DEFAULT_ENV

    @ray_session.remote(num_cpus=0)
    def settings() -> dict:
        return {key: os.environ.get(key) for key in RAY_DEFAULT_ENV}

    assert ray_session.get(settings.remote()) == {key: os.environ[key] for key in RAY_DEFAULT_ENV}
    assert not ray_session.get_runtime_context().runtime_env


def test_exported_settings_are_restored_after_the_block(monkeypatch):
    from hpmkd.components.ray_runtime import exported

    monkeypatch.setenv("HPMKD_KEPT", "before")
    monkeypatch.delenv("HPMKD_NEW", raising=False)
    with exported({"HPMKD_KEPT": "during", "HPMKD_NEW": "during"}):
        assert os.environ["HPMKD_KEPT"] == os.environ["HPMKD_NEW"] == "during"
    assert os.environ["HPMKD_KEPT"] == "before" and "HPMKD_NEW" not in os.environ


@pytest.mark.integration
def test_local_ray_listens_on_loopback_only_and_requires_the_token(ray_session, tmp_path):
    sockets = listening(descendants(os.getpid()))
    assert len({pid for pid, _ in sockets}) >= 3, sockets  # GCS, raylet, dashboard, agents, workers
    assert [s for s in sockets if not loopback(s[1])] == []
    assert os.environ["RAY_AUTH_MODE"] == "token"
    from ray._private.worker import get_dashboard_url

    url = f"http://{get_dashboard_url()}/api/jobs/"
    token = Path(os.environ["RAY_AUTH_TOKEN_PATH"]).read_text().strip() if "RAY_AUTH_TOKEN_PATH" in os.environ \
        else os.environ["RAY_AUTH_TOKEN"]
    for header in ({}, {"Authorization": f"Bearer {secrets.token_hex(32)}"}):
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(urllib.request.Request(url, headers=header), timeout=30)
        assert info.value.code in (401, 403)
    with urllib.request.urlopen(urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"}),
                                timeout=30) as ok:
        assert ok.status == 200
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH_TOKEN")} | {"HOME": str(tmp_path)}
    address = ray_session.get_runtime_context().gcs_address
    joined = subprocess.run([sys.executable, "-c", f"import ray; ray.init(address={address!r})"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert joined.returncode != 0 and "token" in joined.stderr.lower()  # a driver without the token is refused
