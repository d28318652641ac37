"""The Arrow logit cache: exact round trips, keys that miss on any change, crash safety, and real actors filling it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np
import pytest
import torch

from hpmkd.logit_cache import CacheKey, CachedLogits, clear, entry_path, list_entries, lookup, write_entry

KEY = CacheKey(weights="w" * 64, model="cnn_small", data="fp", split="train", view="plain", dtype="float32")


def logits(n=50, c=10, seed=0):
    return np.random.default_rng(seed).normal(scale=3.0, size=(n, c)).astype(np.float32)


def test_float32_round_trip_is_exact_and_indexed_by_row(tmp_path):
    z = logits()
    write_entry(tmp_path, KEY, z)
    entry = lookup(tmp_path, KEY)
    index = torch.tensor([7, 0, 49, 7])
    np.testing.assert_array_equal(entry.rows(index).numpy(), z[[7, 0, 49, 7]])
    assert entry.rows(index).dtype == torch.float32


def test_float16_entries_are_half_the_size_and_close(tmp_path):
    z = logits(n=2000)
    write_entry(tmp_path, KEY, z)
    half = replace(KEY, dtype="float16")
    write_entry(tmp_path, half, z)
    np.testing.assert_allclose(lookup(tmp_path, half).rows(torch.arange(2000)).numpy(), z, rtol=1e-3, atol=2e-3)
    assert entry_path(tmp_path, half).stat().st_size < 0.6 * entry_path(tmp_path, KEY).stat().st_size


def test_top_k_keeps_the_k_largest_logits_and_their_ranking(tmp_path):
    z = logits()
    key = replace(KEY, top_k=3)
    write_entry(tmp_path, key, z)
    rows = lookup(tmp_path, key).rows(torch.arange(50)).numpy()
    top = np.argsort(-z, axis=1)[:, :3]
    np.testing.assert_array_equal(np.argsort(-rows, axis=1)[:, :3], top)
    np.testing.assert_allclose(np.take_along_axis(rows, top, 1), np.take_along_axis(z, top, 1), rtol=1e-6)
    rest = np.ones_like(z, bool)
    np.put_along_axis(rest, top, False, 1)
    assert np.all(rows[rest] <= np.take_along_axis(z, top, 1)[:, -1:].repeat(10, 1)[rest] - 9.99)


@pytest.mark.parametrize("field,value", [("weights", "x" * 64), ("view", "crop_flip:epoch0"), ("data", "other"),
                                         ("split", "val"), ("dtype", "float16"), ("top_k", 5)])
def test_any_change_of_what_makes_the_logits_misses(tmp_path, field, value):
    write_entry(tmp_path, KEY, logits())
    assert lookup(tmp_path, KEY) is not None
    assert lookup(tmp_path, replace(KEY, **{field: value})) is None


CRASHING_WRITER = """
import os, sys, time, numpy as np
from hpmkd.logit_cache import CacheKey, write_entry
from hpmkd.models.ref import ModelRef
def crash_before_rename(src, dst):
    print("tmp written", flush=True)
    time.sleep(60)   # the process is killed here, between the write and the rename
os.replace = crash_before_rename
key = CacheKey(weights="w" * 64, model="cnn_small", data="fp", split="train", view="plain", dtype="float32")
write_entry(sys.argv[1], key, np.ones((200000, 10), np.float32))
"""


def test_a_killed_write_leaves_nothing_readable(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", CRASHING_WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "tmp written"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    leftovers = os.listdir(tmp_path)
    assert len(leftovers) == 1 and leftovers[0].startswith(".")  # only the temporary file exists
    assert lookup(tmp_path, KEY) is None
    assert list(list_entries(tmp_path)) == []
    assert clear(tmp_path) and os.listdir(tmp_path) == []


def test_list_and_clear_by_age(tmp_path):
    write_entry(tmp_path, KEY, logits())
    old = replace(KEY, split="val")
    path = write_entry(tmp_path, old, logits())
    past = time.time() - 3 * 86400
    os.utime(path, (past, past))
    entries = list(list_entries(tmp_path))
    assert [e.key for e in entries] == [old, KEY] and entries[0].rows == 50
    assert clear(tmp_path, older_than_s=86400) == [path]
    assert [e.key for e in list_entries(tmp_path)] == [KEY]


def test_actors_fill_the_cache_once_and_hits_equal_the_teacher(ray_session, tmp_path):
    from hpmkd.components.logit_cache import CachedTeachers, ensure_cached
    from hpmkd.components.teacher_service import release, start_teacher_actors
    from hpmkd.data import Split
    from hpmkd.models.ref import DataShape, ModelRef
    from hpmkd.teachers import LocalTeachers, TeacherSpec

    spec = TeacherSpec("cnn", ModelRef("cnn_small"), DataShape(10, (1, 28, 28)))
    torch.manual_seed(0)
    net = spec.model.build(spec.shape)
    weights = tmp_path / "cnn.pt"
    torch.save(net.state_dict(), weights)
    x = torch.randn(1500, 1, 28, 28)
    pools = start_teacher_actors([spec], [str(weights)], cpus=0.5, gpus=0.0)
    try:
        kwargs = dict(root=str(tmp_path / "cache"), fingerprint="fp", dtype="float32")
        rows = Split(x, torch.zeros(len(x), dtype=torch.long))
        [first] = ensure_cached(pools, [spec], [str(weights)], rows, **kwargs)
        [again] = ensure_cached(pools, [spec], [str(weights)], rows, **kwargs)
    finally:
        release(pools)
    assert [u.hit for u in first] == [False] and [u.hit for u in again] == [True]
    index = torch.tensor([3, 1499, 1024, 0])
    served = CachedTeachers(["cnn"], [[first[0].path]]).request(x[index], index, [[]])()
    expected = LocalTeachers(["cnn"], [net]).request(x[index], index, [[]])()
    torch.testing.assert_close(served.logits, expected.logits, rtol=0, atol=1e-5)
    # new weights -> a different key -> the old entry is not served
    torch.save({k: v + 0.01 if v.is_floating_point() else v for k, v in net.state_dict().items()}, weights)
    from hpmkd.components.logit_cache import teacher_key

    assert lookup(tmp_path / "cache", teacher_key(spec, str(weights), "fp", "train", "plain", "float32", None)) is None
    assert isinstance(CachedLogits(first[0].path).key, CacheKey)


def test_cli_lists_and_clears_entries(tmp_path):
    write_entry(tmp_path, KEY, logits())
    run = lambda *a: subprocess.run([sys.executable, "-m", "hpmkd.cli", "cache", *a, "--dir", str(tmp_path)],
                                    capture_output=True, text=True, timeout=60)
    listed = run("list")
    assert listed.returncode == 0 and KEY.digest in listed.stdout and "1 entries" in listed.stdout
    kept = run("clear", "--older-than", "1d")
    assert kept.returncode == 0 and "removed 0 files" in kept.stdout
    assert "removed 1 files" in run("clear").stdout
    assert lookup(tmp_path, KEY) is None
