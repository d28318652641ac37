#!/usr/bin/env python
"""Put data sets on a node before Ray starts, where hpmkd will look for them.

::

    python cluster/fetch_data.py --root /home/ray/data cifar10 cifar100 fashion_mnist

On a cluster every Train worker loads its data set from its own node (``data.root``, then ``$HPMKD_DATA``), and so
does the driver. Letting each worker download with ``data.download: true`` would make several processes on one node
write the same files at once; this script downloads once per node instead (from ``setup_commands`` of a launcher
YAML, or at image build time in ``cluster/Dockerfile``), then loads each data set exactly as a stage would and
prints its sizes and fingerprint. Set ``HPMKD_DATA`` to the same ``--root`` on every node.

Exit status: 0 when every data set loaded, 1 when one could not be found or fetched, 2 for an unknown name.
"""

from __future__ import annotations

import argparse
import sys

from hpmkd.data import DATASETS, DatasetNotFoundError, load_dataset
from hpmkd.registry import ConfigError


def fetch(name: str, root: str) -> str:
    """Download ``name`` into ``root`` if it is not there yet, load it, and describe what was loaded."""
    splits = load_dataset(name, root=root, download=True)
    return (f"{name}: train {len(splits.train)}, val {len(splits.val)}, test {len(splits.test)}, "
            f"{splits.num_classes} classes, fingerprint {splits.fingerprint}, from {splits.source}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="cluster/fetch_data.py", description=__doc__.split("\n\n")[0])
    p.add_argument("names", nargs="+", metavar="NAME", help=f"data sets: {', '.join(DATASETS.names())}")
    p.add_argument("--root", required=True, help="folder to download into (use the same path as $HPMKD_DATA)")
    args = p.parse_args(argv)
    for name in args.names:
        try:
            print(fetch(name, args.root), flush=True)
        except ConfigError as err:
            print(f"fetch_data: error: {err}", file=sys.stderr)
            return 2
        except DatasetNotFoundError as err:
            print(f"fetch_data: {name}: {err}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
