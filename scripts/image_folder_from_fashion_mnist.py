"""Write a Fashion-MNIST subset as an image folder (``<out>/train/<class>/<i>.png`` and ``<out>/test/<class>/...``),
resized to ``--size`` pixels (bilinear) as RGB: a generated folder for ``data.name: image_folder`` runs (the GPU
check of ``conf/humpkd_fire.yaml`` at 224 px).

    python scripts/image_folder_from_fashion_mnist.py --out /tmp/fmnist224 --size 224 --per-class 200
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from hpmkd.data.fashion_mnist import fashion_mnist


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--per-class", type=int, default=200, help="training images per class (a quarter as many test)")
    ap.add_argument("--classes", type=int, default=10, help="the first N classes")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    raw = fashion_mnist()
    rng = np.random.default_rng(args.seed)
    for split, x, y, count in (("train", raw.train_x, raw.train_y, args.per_class),
                               ("test", raw.test_x, raw.test_y, max(1, args.per_class // 4))):
        for label in range(args.classes):
            folder = Path(args.out) / split / raw.class_names[label].replace("/", "-")
            folder.mkdir(parents=True, exist_ok=True)
            rows = rng.choice(np.flatnonzero(y == label), size=count, replace=False)
            for i, row in enumerate(rows):
                image = Image.fromarray(x[row]).convert("RGB").resize((args.size, args.size), Image.Resampling.BILINEAR)
                image.save(folder / f"{i:05d}.png")
    print(f"wrote {args.out}: {args.classes} classes, {args.per_class} training images each, {args.size} px")


if __name__ == "__main__":
    main()
