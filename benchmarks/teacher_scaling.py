"""Student epoch time against the number of teachers (1, 2, 4, 8), with the teachers computed online in the training
process and read from the Arrow cache; writes a PNG plot and a Markdown table.

    python benchmarks/teacher_scaling.py [--quick] [--train 5000] [--rounds 2] [--out docs]

Same student, teacher type and KD recipe as ``teacher_cache.py`` (each teacher costs 15× a student training step
in FLOPs). The cache is filled once for all 8 teachers by 8 actors (a quarter CPU each). Every configuration is
then timed one epoch per round, rounds interleaving all configurations (cached ones 3 epochs per round: they are
short, so other processes on a shared machine disturb them most), and the fastest epoch of each is reported (the
least disturbed). Online time should grow linearly with the teachers (each adds its forward pass to every step);
cached time should stay flat (each adds one memory-mapped row lookup). Writes ``<out>/teacher_scaling.png`` and ``<out>/teacher_scaling.md``.
Last line: ``cached_8_over_1=<cached epoch time with 8 teachers / with 1>``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import ray  # noqa: E402

from hpmkd.components.logit_cache import CachedTeachers  # noqa: E402
from hpmkd.components.teacher_service import release  # noqa: E402
from hpmkd.teachers import LocalTeachers  # noqa: E402
from kd_setup import (TEACHER, cost_ratios, data_config, distill_spec, epoch_seconds, fill_cache, load,  # noqa: E402
                      print_costs, save_teachers, start_ray, start_teachers)

COUNTS = (1, 2, 4, 8)
ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1,000 training images, 1 round (under 3 minutes)")
    ap.add_argument("--train", type=int, default=5000, help="training images")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "docs"), help="folder for teacher_scaling.png and .md")
    args = ap.parse_args()
    train, rounds = (1000, 1) if args.quick else (args.train, args.rounds)

    costs = cost_ratios()
    print_costs(costs)
    data = data_config(train)
    splits = load(data)
    start_ray()
    with tempfile.TemporaryDirectory() as tmp:
        specs, weights, nets = save_teachers(max(COUNTS), Path(tmp) / "teachers")
        pools = start_teachers(specs, weights, cpus=0.25)
        try:
            [cache], fill_s = fill_cache(pools, specs, weights, splits, Path(tmp) / "cache")
        finally:
            release(pools)
        ray.shutdown()
        names = [s.name for s in specs]
        times: dict[tuple[str, int], list[float]] = {}
        for _ in range(rounds):
            for n in COUNTS:
                for mode, source, epochs in (("online", LocalTeachers(names[:n], nets[:n]), 1),
                                             ("cached", CachedTeachers(names[:n], [cache[:n]]), 3)):
                    times.setdefault((mode, n), []).extend(epoch_seconds(distill_spec(data, n, epochs), source))
    epoch = {k: min(v) for k, v in times.items()}

    title = (f"{len(splits.train)} training images, batch 128, 1 thread; fastest of {rounds} (online) and "
             f"{3 * rounds} (cached) epochs")
    rows = ["| teachers | online epoch s | cached epoch s | online / cached |", "|---|---|---|---|"]
    rows += [f"| {n} | {epoch['online', n]:.2f} | {epoch['cached', n]:.2f} | {epoch['online', n] / epoch['cached', n]:.1f}× |"
             for n in COUNTS]
    table = "\n".join(rows)
    print(f"\n{title}\n{table}")
    print(f"cache fill (once, {max(COUNTS)} teachers x {len(splits.train)} images, 8 actors): {fill_s:.1f} s")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    for mode, style in (("online", "o-"), ("cached", "s-")):
        ax.plot(COUNTS, [epoch[mode, n] for n in COUNTS], style, label=f"teachers {mode}")
    ax.set_xlabel("number of teachers")
    ax.set_ylabel("student epoch time (s)")
    ax.set_xticks(COUNTS)
    ax.set_ylim(bottom=0)
    ax.set_title(f"Epoch time vs teachers ({TEACHER.model}, {len(splits.train)} images)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "teacher_scaling.png", dpi=120)
    command = "python benchmarks/teacher_scaling.py" + (" --quick" if args.quick else f" --train {train} --rounds {rounds}")
    (out / "teacher_scaling.md").write_text(
        f"# Epoch time against the number of teachers\n\n`{command}` ({title}; teacher forward "
        f"{costs['teacher_fwd_ms']:.0f} ms, student forward {costs['student_fwd_ms']:.1f} ms per batch):\n\n{table}\n\n"
        f"![epoch time against teachers](teacher_scaling.png)\n")
    print(f"wrote {out / 'teacher_scaling.png'} and {out / 'teacher_scaling.md'}")
    print(f"cached_8_over_1={epoch['cached', 8] / epoch['cached', 1]:.2f}")


if __name__ == "__main__":
    main()
