"""``image_folder``: small PNG folders written here, decoded for real by DataLoader workers, split deterministically,
fingerprinted by content; bad folders rejected by name; a stage trained from the stream."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hpmkd.config import DataConfig, TrainConfig, config_from_data
from hpmkd.data import load_dataset
from hpmkd.data.image_folder import FolderSplit, UnreadableImageError
from hpmkd.data.loading import data_shape
from hpmkd.models.ref import ModelRef
from hpmkd.registry import ConfigError
from hpmkd.training import StageEnv, StageSpec, train_stage

CLASSES = ("cat", "dog", "fire")


def write_folder(root: Path, per_class: int = 10, size: tuple[int, int] = (12, 16), seed: int = 0,
                 classes=CLASSES) -> dict[str, np.ndarray]:
    """``root/<class>/<i>.png``: RGB images whose red channel encodes the class (learnable); their pixels by path."""
    rng = np.random.default_rng(seed)
    pixels = {}
    for label, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            image = rng.integers(0, 256, (size[0], size[1], 3), dtype=np.uint8)
            image[..., 0] = 40 + 80 * label + rng.integers(0, 20, size)
            path = root / name / f"{i:03d}.png"
            Image.fromarray(image).save(path)
            pixels[str(path)] = image
    return pixels


def load(root: Path, seed: int = 0, **options):
    return load_dataset("image_folder", root=str(root), seed=seed, options={"workers": 2, **options})


def test_a_folder_is_decoded_for_real_and_split_deterministically(tmp_path):
    pixels = write_folder(tmp_path)
    splits = load(tmp_path, mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
    assert splits.class_names == list(CLASSES) and splits.input_shape == (3, 12, 16) and splits.num_classes == 3
    assert (len(splits.train), len(splits.val), len(splits.test)) == (22, 2, 6)  # test 20 %, then val 10 % of the rest
    assert isinstance(splits.train, FolderSplit) and not hasattr(splits.train, "x")  # paths and labels only
    for split in (splits.train, splits.val, splits.test):
        assert torch.bincount(split.y, minlength=3).min() >= 0
    assert torch.bincount(splits.test.y, minlength=3).tolist() == [2, 2, 2]  # stratified
    seen = []
    for x, y, index in splits.train.batches(8, shuffle=True, seed=3, epoch=1):  # decoded by 2 worker processes
        for row, label, i in zip(x, y, index):
            path = splits.train.files[int(i)]
            expected = (pixels[path].transpose(2, 0, 1) / 255.0 - 0.5) / 0.25
            np.testing.assert_allclose(row.numpy(), expected, atol=1e-5)
            assert CLASSES[int(label)] == Path(path).parent.name
            seen.append(int(i))
    assert sorted(seen) == list(range(22))
    rows_x, rows_y = splits.train.rows(torch.tensor([5, 0, 21]))
    assert torch.equal(rows_y, splits.train.y[[5, 0, 21]]) and rows_x.shape == (3, 3, 12, 16)
    again = load(tmp_path, mean=[0.5] * 3, std=[0.25] * 3)
    assert again.train.files == splits.train.files and again.fingerprint == splits.fingerprint
    other_seed = load(tmp_path, seed=1, mean=[0.5] * 3, std=[0.25] * 3)
    assert other_seed.test.files != splits.test.files and other_seed.fingerprint != splits.fingerprint


def test_reserve_train_leaves_another_experiments_images_out_of_the_training_split(tmp_path):
    write_folder(tmp_path)
    kwargs = dict(root=str(tmp_path), seed=0, options={"workers": 0, "mean": [0.5] * 3, "std": [0.25] * 3})
    everything = load_dataset("image_folder", **kwargs)
    student = load_dataset("image_folder", **kwargs, max_train=6)
    teachers = load_dataset("image_folder", **kwargs, reserve_train=6)
    assert not set(teachers.train.files) & set(student.train.files)
    assert sorted(teachers.train.files + student.train.files) == sorted(everything.train.files)
    assert teachers.val.files == everything.val.files and teachers.test.files == everything.test.files
    assert teachers.fingerprint != everything.fingerprint


def test_fixed_split_folders_resize_crop_grey_and_estimated_statistics(tmp_path):
    write_folder(tmp_path / "train", per_class=8, size=(20, 30))
    write_folder(tmp_path / "test", per_class=3, size=(24, 24), seed=1)
    splits = load(tmp_path, resize=16, crop=14, channels=1)
    assert splits.input_shape == (1, 14, 14) and len(splits.test) == 9 and len(splits.train) + len(splits.val) == 24
    assert all("/test/" in f for f in splits.test.files) and all("/train/" in f for f in splits.train.files)
    x, _ = splits.train.rows(torch.arange(len(splits.train)))
    # the training split's own mean and std (estimated on its images) normalise it
    assert abs(float(x.mean())) < 0.1 and abs(float(x.std()) - 1.0) < 0.1
    assert data_shape("image_folder", str(tmp_path), False, {"resize": [10, 8]}) == (3, (3, 10, 8))
    exact = load(tmp_path, resize=[10, 8])
    assert exact.train.rows(torch.arange(2))[0].shape == (2, 3, 10, 8)


def test_the_fingerprint_covers_the_files_content_not_their_folder(tmp_path):
    write_folder(tmp_path / "a")
    write_folder(tmp_path / "b")
    first = load(tmp_path / "a", mean=[0.5] * 3, std=[0.5] * 3)
    assert load(tmp_path / "b", mean=[0.5] * 3, std=[0.5] * 3).fingerprint == first.fingerprint
    path = Path(first.train.files[0])
    Image.fromarray(np.zeros((12, 16, 3), np.uint8)).save(path)
    assert load(tmp_path / "a", mean=[0.5] * 3, std=[0.5] * 3).fingerprint != first.fingerprint
    assert load(tmp_path / "a", mean=[0.4] * 3, std=[0.5] * 3).fingerprint != first.fingerprint


def test_bad_folders_are_rejected_by_name(tmp_path):
    write_folder(tmp_path / "empty_class")
    (tmp_path / "empty_class" / "smoke").mkdir()
    with pytest.raises(ConfigError, match=r"class folder .*empty_class/smoke holds no image"):
        load(tmp_path / "empty_class")
    write_folder(tmp_path / "broken")
    (tmp_path / "broken" / "dog" / "bad.png").write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match=r"broken/dog/bad\.png is not a readable image"):
        load(tmp_path / "broken")
    write_folder(tmp_path / "mixed")
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "mixed" / "cat" / "big.png")
    with pytest.raises(ConfigError, match=r"data\.options\.resize: the images have different sizes .*big\.png: 20x20"):
        load(tmp_path / "mixed")
    assert load(tmp_path / "mixed", resize=[12, 12]).input_shape == (3, 12, 12)
    with pytest.raises(ConfigError, match=r"data\.options\.crop: .* smaller than the crop"):
        load(tmp_path / "mixed", crop=14)
    with pytest.raises(ConfigError, match="no class folders"):
        (tmp_path / "flat").mkdir()
        load(tmp_path / "flat")
    write_folder(tmp_path / "extra" / "train")
    write_folder(tmp_path / "extra" / "val", classes=("cat", "wolf"))
    with pytest.raises(ConfigError, match=r"val/wolf is a class the training folder does not have"):
        load(tmp_path / "extra")
    with pytest.raises(ConfigError, match="data.root: image_folder needs the folder"):
        load_dataset("image_folder", options={})
    with pytest.raises(ConfigError, match=r"data\.options\.resise: unknown option for dataset 'image_folder'"):
        config_from_data({"experiment": "x", "pipeline": "kd", "teachers": [{"name": "t", "model": "cnn"}],
                          "student": {"model": "cnn"}, "data": {"name": "image_folder", "options": {"resise": 3}}})


def test_a_file_that_breaks_after_the_scan_is_named_when_decoded(tmp_path):
    write_folder(tmp_path)
    splits = load(tmp_path, mean=[0.5] * 3, std=[0.5] * 3)
    Path(splits.train.files[3]).write_bytes(Path(splits.train.files[3]).read_bytes()[:60])  # truncated
    with pytest.raises(UnreadableImageError, match=Path(splits.train.files[3]).name):
        splits.train.preprocess(splits.train.files[3])
    with pytest.raises(Exception, match=Path(splits.train.files[3]).name):  # raised in a worker process
        list(splits.train.batches(30, shuffle=False))


def test_a_stage_trains_from_the_streamed_folder(tmp_path):
    write_folder(tmp_path, per_class=12, size=(8, 8))
    data = DataConfig(name="image_folder", root=str(tmp_path), options={"workers": 1})
    spec = StageSpec("folder", 0, data, ModelRef("cnn", {"width": 4}), TrainConfig(epochs=4, batch_size=8, lr=0.05))
    result = train_stage(spec, StageEnv())
    splits = load_dataset("image_folder", **data.loader_kwargs(0))
    assert result["data_fingerprint"] == splits.fingerprint and len(result["history"]) == 4
    assert math.isfinite(result["test_acc"]) and 0 <= result["test_macro_f1"] <= 1


def test_a_models_own_preprocessing_sets_size_crop_and_normalisation(tmp_path):
    pixels = write_folder(tmp_path, per_class=3, size=(30, 40))
    splits = load(tmp_path, preprocessing="vit_base_patch16_224")  # timm: 224 px, crop_pct 0.9, mean = std = 0.5
    assert splits.input_shape == (3, 224, 224)
    preprocess = splits.train.preprocess
    assert (preprocess.resize, preprocess.crop, preprocess.interpolation) == ((248,), (224, 224), "bicubic")
    assert preprocess.mean == (0.5, 0.5, 0.5) and preprocess.std == (0.5, 0.5, 0.5)
    path = splits.train.files[0]
    resized = Image.fromarray(pixels[path]).resize((331, 248), Image.Resampling.BICUBIC)  # shorter side 248
    left, top = (331 - 224) // 2, (248 - 224) // 2
    expected = np.asarray(resized.crop((left, top, left + 224, top + 224)), np.float32) / 255.0
    np.testing.assert_allclose(preprocess(path).numpy(), (expected.transpose(2, 0, 1) - 0.5) / 0.5, atol=1e-5)
    with pytest.raises(ConfigError, match="preprocessing: 'cnn' is not a torchvision or timm model"):
        load(tmp_path, preprocessing="cnn")
