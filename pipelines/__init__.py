"""Named pipelines: each turns a validated config into a graph of stages (see ``components.scheduler.Stage``)."""

from __future__ import annotations

from pipelines.registry import PIPELINES
from pipelines import kd  # noqa: F401  (registers "kd")

__all__ = ["PIPELINES"]
