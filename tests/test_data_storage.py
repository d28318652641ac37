"""``data.root`` (and a table's path) as a file-system URI (:mod:`hpmkd.data.storage`): real ``file://`` URIs to
folders the tests write give the same arrays and fingerprints as the plain paths; bad URIs are config errors that
name the key and the fix, before anything trains. No network."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest
import torch
from pyarrow.fs import LocalFileSystem, SubTreeFileSystem

from hpmkd.cli import main
from hpmkd.config import DataConfig, TrainConfig, load_config
from hpmkd.data import load_dataset
from hpmkd.data.idx import read_idx
from hpmkd.data.storage import UriPath, data_path
from hpmkd.models.ref import ModelRef
from hpmkd.registry import ConfigError
from hpmkd.training import StageEnv, StageSpec, train_stage
from test_data import write_fake_cifar10, write_fake_fashion
from test_image_folder import write_folder

ROOT = Path(__file__).resolve().parent.parent


def assert_same_splits(local, remote, same_fingerprint: bool = True) -> None:
    """Bit-identical inputs and labels in every split, the same shape, and (unless the data set's options name the
    file) the same fingerprint."""
    assert (remote.fingerprint == local.fingerprint) == same_fingerprint
    assert (remote.num_classes, remote.input_shape, remote.class_names) == (local.num_classes, local.input_shape,
                                                                           local.class_names)
    for name in ("train", "val", "test"):
        a, b = getattr(local, name), getattr(remote, name)
        rows = torch.arange(len(a))
        (xa, ya), (xb, yb) = a.rows(rows), b.rows(rows)
        assert torch.equal(xa, xb) and torch.equal(ya, yb), name


@pytest.mark.parametrize("gz", [False, True])
def test_fashion_mnist_idx_files_through_a_file_uri(tmp_path, monkeypatch, gz):
    monkeypatch.delenv("HPMKD_DATA", raising=False)
    folder = tmp_path / "fashion-mnist"
    arrays = write_fake_fashion(folder, gz=gz)
    local = load_dataset("fashion_mnist", root=str(folder), seed=2, val_fraction=0.2)
    remote = load_dataset("fashion_mnist", root=folder.as_uri(), seed=2, val_fraction=0.2)
    assert_same_splits(local, remote)
    assert remote.source == folder.as_uri()
    # the data set's own subfolder is searched under a URI root too
    above = load_dataset("fashion_mnist", root=tmp_path.as_uri(), seed=2, val_fraction=0.2)
    assert above.source == folder.as_uri() and above.fingerprint == local.fingerprint
    labels = folder.as_uri() + "/t10k-labels-idx1-ubyte" + (".gz" if gz else "")
    np.testing.assert_array_equal(read_idx(labels), arrays["t10k-labels-idx1-ubyte"])


def test_a_subtree_file_system_reads_the_same_idx_bytes(tmp_path):
    arrays = write_fake_fashion(tmp_path, gz=True)
    fs = SubTreeFileSystem(str(tmp_path), LocalFileSystem())
    folder = UriPath("subtree:///", "", "", fs)
    assert (folder / "train-images-idx3-ubyte.gz").is_file() and not (folder / "train-images-idx3-ubyte").is_file()
    assert sorted(p.name for p in folder.iterdir()) == sorted(f"{s}.gz" for s in arrays)
    np.testing.assert_array_equal(read_idx(folder / "train-images-idx3-ubyte.gz"), arrays["train-images-idx3-ubyte"])


def test_cifar_pickles_through_a_file_uri(tmp_path, monkeypatch):
    monkeypatch.delenv("HPMKD_DATA", raising=False)
    write_fake_cifar10(tmp_path)
    local = load_dataset("cifar10", root=str(tmp_path), seed=1, val_fraction=0.2)
    assert_same_splits(local, load_dataset("cifar10", root=tmp_path.as_uri(), seed=1, val_fraction=0.2))


def test_an_image_folder_through_a_file_uri_decodes_the_same_pixels(tmp_path):
    write_folder(tmp_path / "my images", per_class=8)
    options = {"workers": 0, "resize": [10, 12]}
    local = load_dataset("image_folder", root=str(tmp_path / "my images"), seed=0, options=options)
    remote = load_dataset("image_folder", root=(tmp_path / "my images").as_uri(), seed=0, options=options)
    assert_same_splits(local, remote)  # content fingerprint: the files' bytes, wherever they are
    assert all(f.startswith("file:///") for f in remote.train.files)
    # a DataLoader worker process opens each file by its URI
    decode = {"workers": 1, "resize": [10, 12]}
    streamed = load_dataset("image_folder", root=(tmp_path / "my images").as_uri(), seed=0, options=decode)
    for (xa, ya, ia), (xb, yb, ib) in zip(local.train.batches(5, shuffle=True, seed=3),
                                          streamed.train.batches(5, shuffle=True, seed=3)):
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and torch.equal(ia, ib)
    stat = load_dataset("image_folder", root=(tmp_path / "my images").as_uri(), seed=0,
                        options={**options, "fingerprint": "stat"})
    everything = torch.arange(len(local.test))
    assert torch.equal(stat.test.rows(everything)[0], local.test.rows(everything)[0])


def write_table(folder: Path) -> pa.Table:
    rng = np.random.default_rng(0)
    n = 60
    table = pa.table({"a": rng.normal(size=n), "b": np.where(rng.random(n) < 0.1, np.nan, rng.normal(size=n)),
                      "colour": rng.choice(["red", "green", "blue"], n), "y": np.arange(n) % 3})
    folder.mkdir(parents=True, exist_ok=True)
    pcsv.write_csv(table, folder / "rows.csv")
    pq.write_table(table, folder / "rows.parquet")
    with pa.CompressedOutputStream(str(folder / "rows.csv.gz"), "gzip") as out:
        pcsv.write_csv(table, out)
    return table


@pytest.mark.parametrize("file", ["rows.csv", "rows.csv.gz", "rows.parquet"])
def test_a_table_through_a_file_uri(tmp_path, file):
    write_table(tmp_path / "t")
    options = {"target": "y", "categorical": ["colour"]}
    local = load_dataset("table", seed=0, options={**options, "path": str(tmp_path / "t" / file)})
    remote = load_dataset("table", seed=0, options={**options, "path": (tmp_path / "t" / file).as_uri()})
    # a table's options enter its fingerprint, path included (as for two local paths to one file)
    assert_same_splits(local, remote, same_fingerprint=False)
    assert remote.preprocessing == local.preprocessing


def test_a_file_uri_in_the_config_is_kept_and_a_local_root_still_made_absolute(tmp_path, monkeypatch):
    write_fake_fashion(tmp_path / "fm")
    uri = (tmp_path / "fm").as_uri()
    cfg = load_config(ROOT / "conf" / "smoke.yaml", [f"data.root={uri}"])
    assert cfg.data.root == uri and isinstance(data_path(cfg.data.root), UriPath)
    monkeypatch.chdir(tmp_path)
    assert load_config(ROOT / "conf" / "smoke.yaml", ["data.root=fm"]).data.root == str(tmp_path / "fm")
    write_table(tmp_path / "t")
    table = (tmp_path / "t" / "rows.csv").as_uri()
    cfg = load_config(ROOT / "conf" / "smoke.yaml", ["data.name=table", f"data.options={{path: '{table}', target: y}}"])
    assert cfg.data.options["path"] == table


@pytest.mark.parametrize("root, words", [
    ("nosuchfs://bucket/data", ["data.root", "'nosuchfs://bucket/data' is not a URI that a file system reads",
                                "file:///shared/data"]),
    ("hdfs://127.0.0.1:1/data", ["data.root", "the hdfs:// file system", "cannot be opened here", "libhdfs"]),
])
def test_a_uri_no_file_system_reads_is_a_config_error_naming_data_root(root, words, capsys):
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "conf" / "smoke.yaml", [f"data.root={root}"])
    for word in words:
        assert word in str(err.value)
    assert main(["validate", str(ROOT / "conf" / "smoke.yaml"), "--set", f"data.root={root}"]) == 2
    assert capsys.readouterr().err.startswith("hpmkd: error: data.root: ")


def test_a_missing_uri_folder_a_download_to_a_uri_and_a_bad_table_uri_are_config_errors(tmp_path):
    missing = (tmp_path / "absent").as_uri()
    with pytest.raises(ConfigError, match=r"data.root: no folder at 'file:///.*absent' on its file system"):
        load_config(ROOT / "conf" / "smoke.yaml", [f"data.root={missing}"])
    with pytest.raises(ConfigError, match=r"data.root: .* is a URI, and data.download writes to a local folder"):
        load_config(ROOT / "conf" / "smoke.yaml", [f"data.root={tmp_path.as_uri()}", "data.download=true"])
    with pytest.raises(ConfigError, match=r"data.options.path: 'nosuchfs://b/rows.csv' is not a URI"):
        load_config(ROOT / "conf" / "smoke.yaml", ["data.name=table", "data.options={path: 'nosuchfs://b/rows.csv', "
                                                                      "target: y}"])


def test_a_stage_trains_the_same_from_a_uri_root_as_from_the_path(tmp_path):
    """The training loop reads the split from the URI (images decoded by a DataLoader worker process, by URI): the
    same fingerprint, history and test accuracy as from the plain path (training is deterministic on CPU)."""
    write_folder(tmp_path / "imgs", per_class=12, size=(8, 8))
    results = []
    for root in (str(tmp_path / "imgs"), (tmp_path / "imgs").as_uri()):
        data = DataConfig(name="image_folder", root=root, options={"workers": 1})
        spec = StageSpec("folder", 0, data, ModelRef("cnn", {"width": 4}), TrainConfig(epochs=2, batch_size=8,
                                                                                         lr=0.05))
        results.append(train_stage(spec, StageEnv()))
    local, remote = results
    assert remote["data_fingerprint"] == local["data_fingerprint"]
    timeless = [[{k: v for k, v in epoch.items() if not k.endswith("_time_s")} for epoch in r["history"]]
                for r in results]
    assert timeless[0] == timeless[1] and remote["test_acc"] == local["test_acc"]
