"""Student epoch time with 3 teachers: computed online in the training process, served by Ray actors, read from the
Arrow cache; side by side in one run, on the same data, student and teachers.

    python benchmarks/teacher_cache.py [--quick] [--train 10000] [--rounds 3]

Each teacher (``cnn_small``, full-resolution stem) costs 15× a whole student training step in FLOPs (45× the
student's forward pass; checked and printed first, with measured times). The training process runs on one thread
(a Ray Train worker with ``cpus_per_worker: 1``); each actor has half a CPU. The three sources are timed in rounds
(online, actors, cache, then again), one epoch each, and the median epoch time of each is reported, so load
changes on the machine hit all three alike. The actors fill the cache once beforehand (its one-off cost is
printed), then serve the actor epochs. The first batch's loss must be identical from all three sources (float32
entries).
Last line: ``cache_speedup=<online epoch time / cache epoch time>``.
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

import ray

from hpmkd.components.logit_cache import CachedTeachers
from hpmkd.components.teacher_service import ActorTeachers, release
from hpmkd.teachers import LocalTeachers
from kd_setup import (cost_ratios, data_config, distill_spec, epoch_seconds, fill_cache, first_batch_loss,
                      images_and_rounds, load, print_costs, save_teachers, start_ray, start_teachers)

TEACHERS = 3


def main() -> None:
    train, rounds = images_and_rounds(__doc__, 10000, 3, (2000, 2), "2,000 training images, 2 rounds (under 3 minutes)")

    print_costs(cost_ratios())
    data = data_config(train)
    splits = load(data)
    spec = distill_spec(data, TEACHERS, epochs=1)
    start_ray()
    with tempfile.TemporaryDirectory() as tmp:
        specs, weights, nets = save_teachers(TEACHERS, Path(tmp) / "teachers")
        pools = start_teachers(specs, weights)
        try:
            cache, fill_s = fill_cache(pools, specs, weights, splits, Path(tmp) / "cache")
            names = [s.name for s in specs]
            sources = {
                "online (in the training process)": LocalTeachers(names, nets),
                "actors (Ray, 1 per teacher)": ActorTeachers(names, pools),
                "cache (Arrow, memory-mapped)": CachedTeachers(names, cache),
            }
            losses = {mode: first_batch_loss(spec, source) for mode, source in sources.items()}
            times: dict[str, list[float]] = {mode: [] for mode in sources}
            for _ in range(rounds):
                for mode, source in sources.items():
                    times[mode] += epoch_seconds(spec, source)
        finally:
            release(pools)
    ray.shutdown()

    epoch = {mode: statistics.median(t) for mode, t in times.items()}
    online = epoch["online (in the training process)"]
    print(f"\n{TEACHERS} teachers, {len(splits.train)} training images, batch 128, median of {rounds} epochs per source")
    print(f"{'teacher outputs':<36}{'epoch s':>9}{'speedup':>9}{'first-batch loss':>20}")
    for mode in sources:
        print(f"{mode:<36}{epoch[mode]:>9.2f}{online / epoch[mode]:>8.2f}x{losses[mode]:>20.10f}")
    print(f"cache fill (once, {TEACHERS} teachers x {len(splits.train)} images, by the actors): {fill_s:.1f} s")
    spread = max(losses.values()) - min(losses.values())
    print(f"first-batch losses identical across sources: max difference {spread:.2e}")
    assert spread <= 1e-6, f"the three sources gave different first-batch losses: {losses}"
    print(f"cache_speedup={online / epoch['cache (Arrow, memory-mapped)']:.2f}")


if __name__ == "__main__":
    main()
