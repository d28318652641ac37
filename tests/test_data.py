"""Data sets, splits, fingerprints, batching and augmentation (hpmkd.data), checked against hand computations."""

from __future__ import annotations

import gzip
import json
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hpmkd.data import (
    AUGMENTATIONS,
    DATASETS,
    DatasetNotFoundError,
    Split,
    augment,
    iterate_batches,
    load_dataset,
)
from hpmkd.data import fashion_mnist as fmnist_module
from hpmkd.data.batching import epoch_order
from hpmkd.data.idx import IdxFormatError, read_idx
from hpmkd.data.source import RowSubset
from hpmkd.data.splits import allocate, split_indices, stratified_take, stream_rng, trial_rows
from hpmkd.registry import ConfigError

REPO = Path(__file__).resolve().parents[1]
SYSTEM_FMNIST = Path("/usr/share/datasets/fashion-mnist")


# ----------------------------------------------------------------------------------------------------------- helpers


def idx_bytes(array: np.ndarray, type_code: int, dtype: str) -> bytes:
    """An IDX file written by hand: magic 0x00 0x00 <type> <ndim>, big-endian uint32 dims, big-endian values."""
    header = struct.pack(">BBBB", 0, 0, type_code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(dtype).tobytes()


def write_fake_fashion(folder: Path, n_train: int = 60, n_test: int = 20, seed: int = 0, gz: bool = True) -> dict:
    """Four small Fashion-MNIST IDX files (28×28 uint8 images, labels cycling over 10 classes)."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(n_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test) % 10).astype(np.uint8),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for stem, array in arrays.items():
        data = idx_bytes(array, 0x08, "u1")
        if gz:
            (folder / f"{stem}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / stem).write_bytes(data)
    return arrays


def write_fake_cifar10(root: Path, n_per_batch: int = 10) -> dict:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8)
        batch = {"data": data, "labels": list(np.arange(n_per_batch) % 10)}
        batches[name] = batch
        (folder / name).write_bytes(pickle.dumps(batch))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": names}))
    return batches


@pytest.fixture
def no_system_fmnist(monkeypatch, tmp_path):
    """Point the system Fashion-MNIST folder and $HPMKD_DATA away from the machine's copy."""
    monkeypatch.setattr(fmnist_module, "SYSTEM_DIR", str(tmp_path / "no-system-copy"))
    monkeypatch.delenv("HPMKD_DATA", raising=False)


# --------------------------------------------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_uint8_images_plain_and_gzip(tmp_path, gz):
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    data = idx_bytes(array, 0x08, "u1")
    assert data[:4] == b"\x00\x00\x08\x03" and data[4:16] == b"\x00\x00\x00\x02\x00\x00\x00\x03\x00\x00\x00\x04"
    path = tmp_path / ("a.gz" if gz else "a")
    path.write_bytes(gzip.compress(data) if gz else data)
    out = read_idx(path)
    assert out.dtype == np.uint8 and out.shape == (2, 3, 4)
    np.testing.assert_array_equal(out, array)


def test_read_idx_big_endian_int32_and_float(tmp_path):
    ints = np.array([1, -2, 70000], dtype=np.int64)
    (tmp_path / "i").write_bytes(idx_bytes(ints, 0x0C, ">i4"))
    assert read_idx(tmp_path / "i").tolist() == [1, -2, 70000]
    floats = np.array([[0.5, -1.25]])
    (tmp_path / "f").write_bytes(idx_bytes(floats, 0x0D, ">f4"))
    np.testing.assert_array_equal(read_idx(tmp_path / "f"), floats.astype(np.float32))


def test_read_idx_rejects_bad_magic_and_truncated_files(tmp_path):
    good = idx_bytes(np.zeros((2, 3), dtype=np.uint8), 0x08, "u1")
    (tmp_path / "truncated").write_bytes(good[:-1])
    with pytest.raises(IdxFormatError, match=r"truncated.*shape \(2, 3\)|shape \(2, 3\).*truncated"):
        read_idx(tmp_path / "truncated")
    (tmp_path / "magic").write_bytes(b"\x01" + good[1:])
    with pytest.raises(IdxFormatError, match="magic"):
        read_idx(tmp_path / "magic")
    (tmp_path / "type").write_bytes(b"\x00\x00\x07\x02" + good[4:])
    with pytest.raises(IdxFormatError, match="0x07"):
        read_idx(tmp_path / "type")


# ------------------------------------------------------------------------------------------------ Fashion-MNIST files


@pytest.mark.parametrize("gz", [False, True])
def test_fashion_mnist_from_root_normalised_with_published_constants(tmp_path, no_system_fmnist, gz):
    arrays = write_fake_fashion(tmp_path / "fm", gz=gz)
    splits = load_dataset("fashion_mnist", root=str(tmp_path / "fm"), seed=0, val_fraction=0.2)
    assert splits.source == str(tmp_path / "fm")
    assert splits.num_classes == 10 and splits.class_names[0] == "T-shirt/top" and splits.input_shape == (1, 28, 28)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (48, 12, 20)
    # The test split is the official one, in file order; normalised by hand: (v / 255 - 0.2860) / 0.3530.
    expected = (arrays["t10k-images-idx3-ubyte"].astype(np.float64) / 255 - 0.2860) / 0.3530
    np.testing.assert_allclose(splits.test.x[:, 0].numpy(), expected, rtol=1e-5, atol=1e-5)
    assert splits.test.y.tolist() == (np.arange(20) % 10).tolist()
    assert splits.train.x.dtype == torch.float32 and splits.train.y.dtype == torch.int64
    # Stratified validation split: 6 training images per class, quotas 12 · 6/60 = 1.2 -> one each, and the two
    # left over go to the largest remainders (all equal: the lowest class ids).
    assert np.bincount(splits.val.y.numpy(), minlength=10).tolist() == [2, 2, 1, 1, 1, 1, 1, 1, 1, 1]


def test_fashion_mnist_found_under_hpmkd_data_subfolder(tmp_path, monkeypatch, no_system_fmnist):
    write_fake_fashion(tmp_path / "data" / "fashion-mnist", gz=False)
    monkeypatch.setenv("HPMKD_DATA", str(tmp_path / "data"))
    splits = load_dataset("fashion_mnist", seed=0)
    assert splits.source == str(tmp_path / "data" / "fashion-mnist")
    assert len(splits.test) == 20


def test_fashion_mnist_missing_lists_folders_and_fixes(tmp_path, monkeypatch, no_system_fmnist):
    monkeypatch.setenv("HPMKD_DATA", str(tmp_path / "env"))
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("fashion_mnist")
    assert isinstance(info.value, FileNotFoundError)
    text = str(info.value)
    assert "\n" not in text  # one line: the CLI prints it as `hpmkd: error: ...`
    searched = text.split("searched $HPMKD_DATA and the system folder: ")[1].split(". Fix: ")[0].split(", ")
    assert searched == [str(tmp_path / "env"), str(tmp_path / "env" / "fashion-mnist"),
                        str(tmp_path / "env" / "FashionMNIST" / "raw"), str(tmp_path / "no-system-copy")]
    assert "sudo apt-get install dataset-fashion-mnist" in text
    assert "HPMKD_DATA" in text and "data.root" in text and "data.download: true" in text
    assert "train-images-idx3-ubyte[.gz]" in text


def test_a_given_data_root_is_the_only_place_searched(tmp_path, monkeypatch, no_system_fmnist):
    """No silent fallback: with data.root given, neither $HPMKD_DATA nor the system folder is used, even when they
    hold the data."""
    write_fake_fashion(tmp_path / "env", gz=False)
    monkeypatch.setenv("HPMKD_DATA", str(tmp_path / "env"))
    (tmp_path / "mine").mkdir()
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("fashion_mnist", root=str(tmp_path / "mine"))
    text = str(info.value)
    assert f"searched data.root {str(tmp_path / 'mine')!r}: {tmp_path / 'mine'}, " in text
    assert str(tmp_path / "env") not in text and "no-system-copy" not in text
    assert "point data.root at the folder that holds the four files" in text
    assert load_dataset("fashion_mnist").source == str(tmp_path / "env")  # without data.root it is found


def test_fashion_mnist_incomplete_folder_is_not_used(tmp_path, no_system_fmnist):
    write_fake_fashion(tmp_path / "fm")
    (tmp_path / "fm" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetNotFoundError, match="searched data.root"):
        load_dataset("fashion_mnist", root=str(tmp_path / "fm"))


HAVE_FMNIST = (SYSTEM_FMNIST / "train-images-idx3-ubyte.gz").is_file()


@pytest.mark.skipif(not HAVE_FMNIST, reason="dataset-fashion-mnist not installed")
def test_fashion_mnist_real_files(monkeypatch):
    monkeypatch.delenv("HPMKD_DATA", raising=False)
    splits = load_dataset("fashion_mnist", seed=0)
    assert splits.source == str(SYSTEM_FMNIST)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (54000, 6000, 10000)
    assert tuple(splits.train.x.shape[1:]) == (1, 28, 28)
    # 6 000 training images per class; a stratified 10 % gives exactly 600 of each in val, 1 000 per class in test.
    assert np.bincount(splits.val.y.numpy()).tolist() == [600] * 10
    assert np.bincount(splits.test.y.numpy()).tolist() == [1000] * 10
    # The published constants are the training set's statistics: the normalised training split is ~N(0, 1).
    assert abs(splits.train.x.mean().item()) < 0.01 and abs(splits.train.x.std().item() - 1) < 0.01
    small = load_dataset("fashion_mnist", seed=0, max_train=10, max_val=10, max_test=10)
    for part in (small.train, small.val, small.test):
        assert sorted(part.y.tolist()) == list(range(10))


# --------------------------------------------------------------------------------------------------------- CIFAR


def test_cifar10_reads_torchvision_pickles(tmp_path, monkeypatch):
    monkeypatch.delenv("HPMKD_DATA", raising=False)
    batches = write_fake_cifar10(tmp_path)
    splits = load_dataset("cifar10", root=str(tmp_path), seed=3, val_fraction=0.2)
    assert splits.input_shape == (3, 32, 32) and splits.num_classes == 10 and splits.class_names[-1] == "truck"
    assert (len(splits.train), len(splits.val), len(splits.test)) == (40, 10, 10)
    raw = batches["test_batch"]["data"].reshape(10, 3, 32, 32).astype(np.float64) / 255
    mean = np.array([0.4914, 0.4822, 0.4465])[None, :, None, None]
    std = np.array([0.2470, 0.2435, 0.2616])[None, :, None, None]
    np.testing.assert_allclose(splits.test.x.numpy(), (raw - mean) / std, rtol=1e-5, atol=1e-5)


def test_cifar_without_root_says_set_data_root(monkeypatch):
    monkeypatch.delenv("HPMKD_DATA", raising=False)
    with pytest.raises(DatasetNotFoundError, match="set data.root"):
        load_dataset("cifar100")


def test_cifar_missing_under_root_lists_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("HPMKD_DATA", raising=False)
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("cifar10", root=str(tmp_path))
    assert str(tmp_path / "cifar-10-batches-py") in str(info.value) and "data.download: true" in str(info.value)


# -------------------------------------------------------------------------------------------------------- splits


def test_allocate_largest_remainder_by_hand():
    assert allocate(np.array([50, 30, 20]), 10).tolist() == [5, 3, 2]
    # exact quotas 7·[6, 3, 1]/10 = [4.2, 2.1, 0.7]: floors [4, 2, 0] -> at least one each -> [4, 2, 1].
    assert allocate(np.array([6, 3, 1]), 7).tolist() == [4, 2, 1]
    # exact [4.85, 0.1, 0.05]: floors [4, 0, 0] -> minimum one each [4, 1, 1] (6 > 5) -> take one from class 0.
    assert allocate(np.array([97, 2, 1]), 5).tolist() == [3, 1, 1]
    # fewer samples than classes: largest remainders win, ties to the lower class id.
    assert allocate(np.array([5, 5, 5]), 2).tolist() == [1, 1, 0]
    with pytest.raises(ValueError):
        allocate(np.array([1, 1]), 3)


def test_stratified_take_counts_and_partition():
    labels = np.repeat([0, 1, 2], [50, 30, 20])
    indices = np.arange(100) + 1000
    chosen, rest = stratified_take(indices, labels, 10, np.random.default_rng(0))
    assert np.bincount(labels[chosen - 1000]).tolist() == [5, 3, 2]
    assert sorted(np.concatenate([chosen, rest]).tolist()) == indices.tolist()
    assert chosen.tolist() == sorted(chosen.tolist())


def test_split_indices_seeded_stratified_and_disjoint():
    labels = np.repeat(np.arange(4), [40, 30, 20, 10])
    kwargs = dict(val_fraction=0.1, test_fraction=0.2, max_train=None, max_val=None, max_test=None)
    a = split_indices(labels, None, seed=5, **kwargs)
    b = split_indices(labels, None, seed=5, **kwargs)
    c = split_indices(labels, None, seed=6, **kwargs)
    for part in ("train", "val", "test"):
        np.testing.assert_array_equal(getattr(a, part), getattr(b, part))
    assert not np.array_equal(a.val, c.val) and not np.array_equal(a.test, c.test)
    # Held-out test: 20 % of each class; val: round(0.1 · 80) = 8 of the remaining pool, proportional per class.
    assert np.bincount(labels[a.test]).tolist() == [8, 6, 4, 2]
    assert len(a.val) == 8 and np.bincount(labels[a.val], minlength=4).tolist() == [3, 2, 2, 1]
    assert len(a.train) == 100 - 20 - 8
    assert not set(a.train) & set(a.val) and not set(a.train) & set(a.test) and not set(a.val) & set(a.test)
    assert set(a.train) | set(a.val) | set(a.test) == set(range(100))


def test_split_indices_official_test_and_max_subsets_keep_every_class():
    train_y = np.repeat(np.arange(5), 100)
    test_y = np.repeat(np.arange(5), 20)
    common = dict(seed=0, val_fraction=0.1, test_fraction=0.2)
    full = split_indices(train_y, test_y, **common, max_train=None, max_val=None, max_test=None)
    assert full.test.tolist() == list(range(100))
    small = split_indices(train_y, test_y, **common, max_train=7, max_val=5, max_test=5)
    assert np.bincount(train_y[small.train], minlength=5).min() == 1 and len(small.train) == 7
    assert sorted(train_y[small.val].tolist()) == [0, 1, 2, 3, 4]
    assert sorted(test_y[small.test].tolist()) == [0, 1, 2, 3, 4]
    assert set(small.train) <= set(full.train) and set(small.val) <= set(full.val)
    # max_train draws from its own stream: the validation split does not move.
    np.testing.assert_array_equal(
        split_indices(train_y, test_y, **common, max_train=7, max_val=None, max_test=None).val,
        full.val,
    )


def test_the_meta_split_is_a_stratified_part_of_the_training_split_and_moves_nothing_else():
    labels = np.repeat(np.arange(4), [40, 30, 20, 10])
    kwargs = dict(seed=3, val_fraction=0.1, test_fraction=0.2, max_train=None, max_val=None, max_test=None)
    plain, held = split_indices(labels, None, **kwargs), split_indices(labels, None, **kwargs, meta_fraction=0.25)
    assert len(plain.meta) == 0
    np.testing.assert_array_equal(held.val, plain.val)
    np.testing.assert_array_equal(held.test, plain.test)
    # round(0.25 · 72) = 18 of the 72 training rows (29, 22, 14, 7 per class): quotas 7.25, 5.5, 3.5, 1.75 floored
    # to 7, 5, 3, 1, then the two left go to the largest remainders (class 3, then class 1 on the tie with class 2)
    assert np.bincount(labels[plain.train], minlength=4).tolist() == [29, 22, 14, 7]
    assert np.bincount(labels[held.meta], minlength=4).tolist() == [7, 6, 3, 2]
    assert sorted([*held.train, *held.meta]) == sorted(plain.train) and not set(held.train) & set(held.meta)
    again = split_indices(labels, None, **kwargs, meta_fraction=0.25)
    np.testing.assert_array_equal(again.meta, held.meta)


def test_the_meta_split_enters_the_fingerprint_only_when_there_is_one():
    base = load_dataset("digits", seed=1)
    held = load_dataset("digits", seed=1, meta_fraction=0.1)
    assert base.meta is None and load_dataset("digits", seed=1, meta_fraction=0.0).fingerprint == base.fingerprint
    assert held.fingerprint != base.fingerprint
    assert len(held.train) + len(held.meta) == len(base.train) and len(held.meta) == round(0.1 * len(base.train))
    assert torch.equal(held.val.y, base.val.y) and torch.equal(held.test.y, base.test.y)  # the same rows
    assert sorted([*held.train.y.tolist(), *held.meta.y.tolist()]) == sorted(base.train.y.tolist())
    with pytest.raises(ConfigError, match="data.meta_fraction"):
        load_dataset("digits", meta_fraction=1.0)


def test_reserve_train_leaves_out_exactly_the_rows_another_experiments_max_train_selects():
    labels = np.repeat(np.arange(4), [40, 30, 20, 10])
    kwargs = dict(seed=3, val_fraction=0.1, test_fraction=0.2, max_val=None, max_test=None)
    student = split_indices(labels, None, **kwargs, max_train=12)  # another experiment's training split
    everything = split_indices(labels, None, **kwargs, max_train=None)
    teachers = split_indices(labels, None, **kwargs, max_train=None, reserve_train=12)
    assert not set(teachers.train) & set(student.train)
    assert sorted([*teachers.train, *student.train]) == sorted(everything.train)  # the rest, all of it
    np.testing.assert_array_equal(teachers.val, everything.val)  # nothing else moves
    np.testing.assert_array_equal(teachers.test, everything.test)
    capped = split_indices(labels, None, **kwargs, max_train=30, reserve_train=12)
    assert len(capped.train) == 30 and set(capped.train) <= set(teachers.train)
    remaining = np.bincount(labels[teachers.train], minlength=4)
    assert remaining.tolist() == (np.bincount(labels[everything.train], minlength=4)
                                  - np.bincount(labels[student.train], minlength=4)).tolist()
    assert np.bincount(labels[capped.train], minlength=4).tolist() == allocate(remaining, 30).tolist()
    with pytest.raises(ConfigError, match=r"data.reserve_train: 72 rows reserved, but the training split has only 72"):
        split_indices(labels, None, **kwargs, max_train=None, reserve_train=72)


def test_reserve_train_enters_the_fingerprint_only_when_given():
    base = load_dataset("digits", seed=1)
    reserved = load_dataset("digits", seed=1, reserve_train=100)
    assert reserved.fingerprint != base.fingerprint and len(reserved.train) == len(base.train) - 100
    assert load_dataset("digits", seed=1, reserve_train=None).fingerprint == base.fingerprint
    with pytest.raises(ConfigError, match="data.reserve_train"):
        load_dataset("digits", reserve_train=0)


def test_trial_rows_are_a_seeded_stratified_share_and_a_row_subset_serves_the_parent_indices():
    labels = np.repeat(np.arange(3), [50, 30, 20])
    rows = trial_rows(labels, 0.2, seed=4)
    assert np.bincount(labels[rows]).tolist() == [10, 6, 4] and (np.diff(rows) > 0).all()
    np.testing.assert_array_equal(rows, trial_rows(labels, 0.2, seed=4))
    assert not np.array_equal(rows, trial_rows(labels, 0.2, seed=5))
    np.testing.assert_array_equal(trial_rows(labels, 1.0, seed=4), np.arange(100))
    parent = Split(torch.arange(100, dtype=torch.float32)[:, None] * 10, torch.from_numpy(labels))
    subset = RowSubset(parent, torch.from_numpy(rows))
    seen = []
    for x, y, index in subset.batches(7, shuffle=True, seed=0, epoch=1):
        assert torch.equal(x[:, 0], index.float() * 10) and torch.equal(y, parent.y[index])  # the parent's rows
        seen += index.tolist()
    assert len(subset) == 20 and sorted(seen) == rows.tolist()


def test_stream_rngs_are_distinct():
    assert stream_rng(0, "val").integers(1 << 30) != stream_rng(0, "max_train").integers(1 << 30)


def test_load_dataset_same_seed_same_data_different_seed_differs():
    a = load_dataset("wine", seed=1)
    b = load_dataset("wine", seed=1)
    c = load_dataset("wine", seed=2)
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.val.y, b.val.y) and torch.equal(a.test.x, b.test.x)
    assert not torch.equal(a.test.x, c.test.x)


def test_load_dataset_rejects_bad_arguments():
    with pytest.raises(ConfigError, match="data.val_fraction"):
        load_dataset("iris", val_fraction=1.0)
    with pytest.raises(ConfigError, match="data.max_train"):
        load_dataset("iris", max_train=0)
    with pytest.raises(ConfigError, match="data.name: unknown dataset 'fashion_mnst'.*'fashion_mnist'"):
        load_dataset("fashion_mnst")


# ------------------------------------------------------------------------------------------- sklearn-backed sets


def test_digits_shapes_and_training_statistics():
    splits = load_dataset("digits", seed=0)
    # 1 797 samples: test round(0.2 · 1797) = 359, val round(0.1 · 1438) = 144, train 1294.
    assert (len(splits.train), len(splits.val), len(splits.test)) == (1294, 144, 359)
    assert splits.input_shape == (1, 8, 8) and splits.num_classes == 10
    assert splits.class_names == [str(i) for i in range(10)]
    x = splits.train.x.double()
    assert abs(x.mean().item()) < 1e-5 and abs(x.std(unbiased=False).item() - 1) < 1e-5


def test_tabular_standardised_with_training_split_only():
    from sklearn.datasets import load_breast_cancer

    splits = load_dataset("breast_cancer", seed=0)
    assert splits.input_shape == (30,) and splits.num_classes == 2 and splits.class_names == ["malignant", "benign"]
    assert (len(splits.train), len(splits.val), len(splits.test)) == (409, 46, 114)
    x = splits.train.x.double().numpy()
    np.testing.assert_allclose(x.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(x.std(0), 1, atol=1e-4)
    # Undo the standardisation by hand with the training split's statistics: the val rows are real data rows.
    raw = load_breast_cancer().data
    idx = split_indices(load_breast_cancer().target, None, seed=0, val_fraction=0.1, test_fraction=0.2,
                        max_train=None, max_val=None, max_test=None)
    mu, sd = raw[idx.train].mean(0), raw[idx.train].std(0)
    np.testing.assert_allclose(splits.val.x.double().numpy(), (raw[idx.val] - mu) / sd, rtol=1e-4, atol=1e-4)


def test_iris_max_subsets_keep_every_class():
    splits = load_dataset("iris", seed=3, max_train=3, max_val=3, max_test=3)
    for part in (splits.train, splits.val, splits.test):
        assert sorted(part.y.tolist()) == [0, 1, 2]
        assert part.x.shape == (3, 4)


def test_registered_dataset_names():
    assert DATASETS.names() == ["breast_cancer", "cifar10", "cifar100", "digits", "fashion_mnist", "gaussian_mixture",
                                "image_folder", "iris", "synthetic", "table", "wine"]


# --------------------------------------------------------------------------------------------------- fingerprint


def test_fingerprint_stable_in_a_new_process():
    code = (
        "import json; from hpmkd.data import load_dataset; "
        "print(json.dumps([load_dataset('iris', seed=4, max_train=50).fingerprint, load_dataset('wine').fingerprint]))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    there = json.loads(out.stdout.strip().splitlines()[-1])
    here = [load_dataset("iris", seed=4, max_train=50).fingerprint, load_dataset("wine").fingerprint]
    assert there == here and len(here[0]) == 16 and int(here[0], 16) >= 0


def test_fingerprint_changes_with_every_parameter():
    base = dict(seed=0, val_fraction=0.1, max_train=None, max_val=None, max_test=None)
    variants = [base] + [
        {**base, key: value}
        for key, value in [("seed", 1), ("val_fraction", 0.2), ("max_train", 50), ("max_val", 5), ("max_test", 10)]
    ]
    prints = [load_dataset("iris", **kw).fingerprint for kw in variants]
    assert len(set(prints)) == len(prints)
    assert load_dataset("wine", **base).fingerprint not in prints


def test_fingerprint_follows_content_not_folder(tmp_path, no_system_fmnist):
    write_fake_fashion(tmp_path / "a", seed=0)
    write_fake_fashion(tmp_path / "b", seed=0, gz=False)  # same bytes, other folder, uncompressed
    write_fake_fashion(tmp_path / "c", seed=1)  # other pixels
    fa, fb, fc = (load_dataset("fashion_mnist", root=str(tmp_path / d)).fingerprint for d in "abc")
    assert fa == fb and fa != fc


# ------------------------------------------------------------------------------------------------------- batching


def toy_split(n: int) -> Split:
    return Split(torch.arange(n, dtype=torch.float32)[:, None] * 10, torch.arange(n) % 3)


def test_iterate_batches_single_rank_covers_each_index_once():
    split = toy_split(10)
    batches = list(iterate_batches(split, 4, shuffle=True, seed=0, epoch=0))
    assert [len(b[2]) for b in batches] == [4, 4, 2]
    index = torch.cat([b[2] for b in batches])
    assert sorted(index.tolist()) == list(range(10))
    for x, y, i in batches:
        assert torch.equal(x[:, 0], i.float() * 10) and torch.equal(y, i % 3) and i.dtype == torch.int64
    assert [len(b[2]) for b in iterate_batches(split, 4, shuffle=True, seed=0, epoch=0, drop_last=True)] == [4, 4]
    plain = torch.cat([b[2] for b in iterate_batches(split, 3, shuffle=False, seed=0, epoch=0)])
    assert plain.tolist() == list(range(10))


def test_iterate_batches_order_depends_on_seed_and_epoch_only():
    split = toy_split(50)

    def order(seed, epoch):
        return torch.cat([b[2] for b in iterate_batches(split, 8, shuffle=True, seed=seed, epoch=epoch)]).tolist()

    assert order(1, 2) == order(1, 2)
    assert order(1, 2) != order(1, 3) and order(1, 2) != order(2, 2)
    assert order(0, 1) != order(1, 0)


@pytest.mark.parametrize("n,world_size", [(7, 2), (10, 2), (2, 4), (9, 3)])
def test_iterate_batches_distributed_like_distributed_sampler(n, world_size):
    split = toy_split(n)
    full = epoch_order(n, shuffle=True, seed=3, epoch=1).tolist()
    total = -(-n // world_size) * world_size
    padded = (full * total)[:total]  # DistributedSampler pads by repeating the permutation's head
    shards = []
    for rank in range(world_size):
        batches = iterate_batches(split, 2, shuffle=True, seed=3, epoch=1, rank=rank, world_size=world_size)
        got = torch.cat([b[2] for b in batches])
        assert got.tolist() == padded[rank::world_size]
        shards.append(got.tolist())
    assert len({len(s) for s in shards}) == 1
    # Every index at least once; the only repeats are the padding.
    assert sorted(sum(shards, [])) == sorted(list(range(n)) + padded[n:])


def test_iterate_batches_rejects_bad_rank():
    with pytest.raises(ValueError, match="rank"):
        list(iterate_batches(toy_split(4), 2, shuffle=False, seed=0, epoch=0, rank=2, world_size=2))


# --------------------------------------------------------------------------------------------------- augmentation


def expected_crop_flip(x: np.ndarray, offsets: np.ndarray, flips: np.ndarray) -> np.ndarray:
    """Crop-then-flip computed per sample with NumPy slicing."""
    b, _, h, w = x.shape
    padded = np.pad(x, ((0, 0), (0, 0), (4, 4), (4, 4)))
    rows, cols = offsets
    out = np.stack([padded[i, :, rows[i] : rows[i] + h, cols[i] : cols[i] + w] for i in range(b)])
    out[flips] = out[flips][..., ::-1]
    return out


def test_crop_flip_matches_hand_computation():
    x = torch.randn(6, 2, 5, 7, generator=torch.Generator().manual_seed(0))
    out = augment("crop_flip", x, torch.Generator().manual_seed(11))
    assert out.shape == x.shape
    g = torch.Generator().manual_seed(11)  # the same draws, in the documented order: offsets, then flips
    offsets = torch.randint(0, 9, (2, 6), generator=g).numpy()
    flips = (torch.rand(6, generator=g) < 0.5).numpy()
    np.testing.assert_array_equal(out.numpy(), expected_crop_flip(x.numpy(), offsets, flips))
    assert 0 < flips.sum() < 6 and (offsets != 4).any()  # this seed exercises both branches and real shifts


def test_crop_flip_shifts_content_by_at_most_four_pixels():
    x = torch.arange(1, 1 + 8 * 3 * 9 * 9, dtype=torch.float32).reshape(8, 3, 9, 9)
    out = augment("crop_flip", x, torch.Generator().manual_seed(2))
    padded = np.pad(x.numpy(), ((0, 0), (0, 0), (4, 4), (4, 4)))
    for i in range(8):
        candidates = [
            view
            for dy in range(9)
            for dx in range(9)
            for view in (padded[i, :, dy : dy + 9, dx : dx + 9], padded[i, :, dy : dy + 9, dx : dx + 9][..., ::-1])
        ]
        assert any(np.array_equal(out[i].numpy(), c) for c in candidates)


def test_flip_twice_with_same_generator_is_identity():
    x = torch.randn(16, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    once = augment("flip", x, torch.Generator().manual_seed(5))
    twice = augment("flip", once, torch.Generator().manual_seed(5))
    assert torch.equal(twice, x)
    flipped = [not torch.equal(once[i], x[i]) for i in range(16)]
    assert 0 < sum(flipped) < 16
    for i in range(16):
        assert torch.equal(once[i], x[i].flip(-1) if flipped[i] else x[i])


def test_augmentations_registry_and_errors():
    assert AUGMENTATIONS.names() == ["crop_flip", "flip", "none"]
    tab = torch.randn(4, 3)
    assert augment("none", tab, torch.Generator()) is tab
    with pytest.raises(ConfigError, match="data.augment.*none for tabular"):
        augment("crop_flip", tab, torch.Generator())
    with pytest.raises(ConfigError, match="data.augment: unknown augmentation 'crop'"):
        augment("crop", tab, torch.Generator())
