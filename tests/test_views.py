"""The view bank (hpmkd.data.views): views regenerate bit for bit from (seed, view, index), whatever the batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hpmkd.data import load_dataset
from hpmkd.data.views import PLAIN, KeyedDraws, ViewBank


@pytest.fixture(scope="module")
def images():
    splits = load_dataset("fashion_mnist", seed=0, max_train=600, max_val=100, max_test=100)
    return splits.train.x


def test_a_view_is_the_same_whichever_batch_renders_it(images):
    bank = ViewBank("crop_flip", seed=3, views=4)
    everything = bank.render(images, torch.arange(len(images)), 2)
    rows = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:37]
    assert torch.equal(bank.render(images[rows], rows, 2), everything[rows])
    assert torch.equal(ViewBank("crop_flip", seed=3, views=8).render(images[rows], rows, 2), everything[rows])


def test_views_seeds_and_samples_all_differ(images):
    index = torch.arange(len(images))
    bank = ViewBank("crop_flip", seed=0, views=2)
    view0, view1 = bank.render(images, index, 0), bank.render(images, index, 1)
    other_seed = ViewBank("crop_flip", seed=1, views=2).render(images, index, 0)
    changed = lambda a, b: (a != b).flatten(1).any(1).float().mean().item()  # noqa: E731
    # 81 crop offsets x 2 flips: a sample keeps the same pixels in another view with probability ~1/162 (plus
    # the few images that are symmetric or have empty borders)
    assert changed(view0, view1) > 0.9 and changed(view0, other_seed) > 0.9
    assert bank.names() == ["crop_flip:seed=0:view=0", "crop_flip:seed=0:view=1"]
    assert [bank.view_of(e) for e in range(5)] == [0, 1, 0, 1, 0]


def test_rendering_follows_the_documented_draws(images):
    """Offsets first (two per sample), then flips, exactly as the generator path does (test_data.py)."""
    index = torch.tensor([5, 0, 599, 42, 7, 300])
    draws = KeyedDraws(9, 1, index)
    offsets = draws.integers(9, 2, len(index)).numpy()
    flips = (draws.uniform(len(index)) < 0.5).numpy()
    x = images[index].numpy()
    padded = np.pad(x, ((0, 0), (0, 0), (4, 4), (4, 4)))
    expected = np.stack([padded[i, :, offsets[0, i] : offsets[0, i] + 28, offsets[1, i] : offsets[1, i] + 28]
                         for i in range(len(index))])
    expected[flips] = expected[flips][..., ::-1]
    np.testing.assert_array_equal(ViewBank("crop_flip", 9, 2).render(images[index], index, 1).numpy(), expected)


def test_keyed_draws_are_uniform():
    draws = KeyedDraws(0, 0, torch.arange(90_000))
    offsets = draws.integers(9, 2, 90_000)
    counts = torch.bincount(offsets.flatten(), minlength=9).float() / offsets.numel()
    assert torch.allclose(counts, torch.full((9,), 1 / 9), atol=0.005)
    u = draws.uniform(90_000)
    assert 0.0 <= u.min() and u.max() < 1.0 and abs(u.mean().item() - 0.5) < 0.005
    assert abs(np.corrcoef(offsets[0].numpy(), offsets[1].numpy())[0, 1]) < 0.02  # the two offsets are independent


def test_the_plain_bank_is_the_stored_tensors(images):
    index = torch.arange(10)
    assert torch.equal(PLAIN.render(images[:10], index, 0), images[:10])
    assert PLAIN.names() == ["plain"]
    with pytest.raises(ValueError, match="at least one view"):
        ViewBank("flip", 0, 0)
