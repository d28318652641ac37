"""Training throughput of models side by side, in one process, on this machine's CPU (one thread).

    python benchmarks/model_speed.py [--batch 128] [--steps 8]

Prints images/second for each model and, last, ``stem_stride_speedup=X``: ``cnn_small`` with ``stem_stride: 2``
against the same network with its stem at full resolution (same parameters).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from hpmkd.models import count_params, create_model

MODELS = [
    ("cnn_small", {}),
    ("cnn_small", {"stem_stride": 2}),
    ("cnn", {"width": 9, "stem_stride": 2}),
    ("mlp", {"hidden": 512, "depth": 2}),
]


def images_per_second(name: str, options: dict, batch: int, steps: int) -> tuple[int, float]:
    model = create_model(name, num_classes=10, in_channels=1, input_shape=(1, 28, 28), **options)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    for i in range(steps + 2):  # two warm-up steps
        if i == 2:
            began = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return count_params(model), batch * steps / (time.perf_counter() - began)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(1)
    speed = {}
    print(f"{'model':<12}{'options':<32}{'params':>10}{'img/s':>10}")
    for name, options in MODELS:
        params, ips = images_per_second(name, options, args.batch, args.steps)
        speed[(name, tuple(sorted(options.items())))] = ips
        print(f"{name:<12}{str(options):<32}{params:>10,}{ips:>10.0f}")
    ratio = speed[("cnn_small", (("stem_stride", 2),))] / speed[("cnn_small", ())]
    print(f"stem_stride_speedup={ratio:.2f}")


if __name__ == "__main__":
    main()
