"""What verifying a logit-cache entry costs when it is opened, against opening it unverified and against reading it
once through (one epoch of a distillation stage reading every row by batches), side by side in one process.

    python benchmarks/cache_verify.py [--quick] [--rows 54000] [--classes 10] [--feature 2048] [--repeats 5]

Two entries are written (float16, as ``distill.cache_dtype`` defaults): logits ``[rows, classes]`` (Fashion-MNIST's
54,000 training images, 10 classes: the common case) and logits plus one feature tap of ``feature`` values per row
(``distill.cache_features``: the large case). For each, the median over ``repeats`` of: the unverified open
(memory-map, read the table, view the columns: what :class:`hpmkd.logit_cache.CachedLogits` did before checksums),
the verified open (the same plus a CRC-32 of every column), and one pass over all rows in batches of 128 in a
shuffled order (what an epoch reads). Last line: ``verify_over_epoch=<(verified − unverified open) / epoch read>``
for the feature entry.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from hpmkd.logit_cache import CacheKey, CachedLogits, flat_values, write_entry


def unverified_open(path: Path) -> None:
    table = pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()
    for name in table.column_names:
        flat_values(table.column(name), table.column(name).type.list_size)


def epoch_read(path: Path, taps: list[str]) -> None:
    entry = CachedLogits(path)
    order = torch.randperm(entry.rows_count, generator=torch.Generator().manual_seed(0))
    for batch in order.split(128):
        entry.rows(batch)
        if taps:
            entry.features(batch, taps)


def median_s(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="10,000 rows, 512 feature values, 3 repeats")
    ap.add_argument("--rows", type=int, default=54000)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--feature", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    rows, feature, repeats = (10000, 512, 3) if args.quick else (args.rows, args.feature, args.repeats)
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(rows, args.classes)).astype(np.float32)
    key = CacheKey("w" * 64, "bench", "fp", "train", "plain", "float16")
    print(f"{'entry':<26}{'MiB':>8}{'open s':>10}{'verified s':>12}{'verify s':>10}{'epoch read s':>14}"
          f"{'verify/epoch':>14}")
    ratio = float("nan")
    with tempfile.TemporaryDirectory() as tmp:
        entries = {
            "logits": (write_entry(tmp, key, logits), []),
            f"logits + {feature} features": (
                write_entry(tmp, CacheKey(**{**key.__dict__, "taps": ("f",)}), logits,
                            {"f": rng.normal(size=(rows, feature)).astype(np.float16)}), ["f"]),
        }
        for name, (path, taps) in entries.items():
            plain = median_s(lambda: unverified_open(path), repeats)
            verified = median_s(lambda: CachedLogits(path), repeats)
            epoch = median_s(lambda: epoch_read(path, taps), max(1, repeats // 2))
            ratio = (verified - plain) / epoch
            print(f"{name:<26}{path.stat().st_size / 2**20:>8.1f}{plain:>10.4f}{verified:>12.4f}"
                  f"{verified - plain:>10.4f}{epoch:>14.3f}{ratio:>14.3f}")
    print(f"verify_over_epoch={ratio:.3f}")


if __name__ == "__main__":
    main()
