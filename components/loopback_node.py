"""``ray start`` for a node that joins a cluster on this machine at a loopback address and listens on loopback too.

Run as ``python -m hpmkd.components.loopback_node start --address=127.0.0.1:PORT --node-ip-address=127.0.0.1 ...``
(the arguments are ``ray``'s). Ray 2.60 refuses to start a worker node in its single-machine mode (the mode that
keeps a local head on 127.0.0.1, :mod:`hpmkd.components.ray_runtime`), and in cluster mode it replaces every loopback
address it is given, the head's included, by this machine's network address
(``ray._private.services.resolve_ip_for_localhost``), where a loopback-only head is not listening. This entry point
keeps the addresses it is given as they are, then runs Ray's own command line unchanged.
"""

from __future__ import annotations

import sys

import ray._private.services as services
from ray.scripts.scripts import main


def keep_address(host: str) -> str:
    """``resolve_ip_for_localhost`` that resolves nothing: the address given is the address used."""
    if not host:
        raise ValueError(f"Malformed host: {host}")
    return host


if __name__ == "__main__":
    services.resolve_ip_for_localhost = keep_address
    sys.exit(main())
