"""Markdown tables of pipeline runs: the columns they show, grouping runs by configuration, mean ± std over seeds.

Two pipeline runs have the same configuration when their params (the flattened resolved config) are equal apart
from the seed and the keys that only say where things are kept (:data:`PLACE_KEYS`). Over the seeds of one
configuration, the newest finished run of each seed counts once.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence, TypeVar

from hpmkd.components.report.records import PipelineRecord

#: params that do not change what a run computes: the seed (varied on purpose) and storage locations
PLACE_KEYS = ("seed", "output_dir", "cache_dir", "data.root", "ray.address", "ray.storage_path")
PLACE_PREFIXES = ("mlflow.",)

T = TypeVar("T")


@dataclass(frozen=True)
class Column:
    """A number shown per pipeline run (and as mean ± std per configuration)."""

    title: str
    value: Callable[[PipelineRecord], float | None]
    scale: float = 1.0
    digits: int = 3

    def show(self, value: float | None) -> str:
        return "-" if value is None else f"{value * self.scale:.{self.digits}f}"


def metric(key: str) -> Callable[[PipelineRecord], float | None]:
    return lambda p: p.metrics.get(key)


COLUMNS = (
    Column("student test acc (%)", metric("student_test_acc"), scale=100, digits=2),
    Column("retention", metric("retention")),
    Column("student test AUC", metric("student_test_auc")),
    Column("AUC retention", metric("auc_retention")),
    Column("compression (×)", metric("compression"), digits=1),
    Column("wall (s)", lambda p: p.wall_s, digits=1),
)


@dataclass(frozen=True)
class ConfigGroup:
    """Pipeline runs with the same configuration; ``changes`` names the settings in which it differs from the first
    configuration (``-`` for the first itself)."""

    label: str
    changes: str
    runs: tuple[PipelineRecord, ...]

    def seed_runs(self) -> list[PipelineRecord]:
        """The newest finished run of each seed, by seed."""
        newest = {p.seed: p for p in self.runs if p.status == "FINISHED"}  # runs are oldest first
        return [newest[s] for s in sorted(newest, key=seed_order)]


def seed_order(seed: str) -> tuple[int, str]:
    return (int(seed), "") if seed.lstrip("-").isdigit() else (0, seed)


def comparable(params: Mapping[str, T]) -> dict[str, T]:
    """``params`` (flattened config keys) without the seed and the storage locations (:data:`PLACE_KEYS`,
    :data:`PLACE_PREFIXES`): what decides whether two runs have the same configuration."""
    return {k: v for k, v in params.items() if k not in PLACE_KEYS and not k.startswith(PLACE_PREFIXES)}


def identity(p: PipelineRecord) -> tuple[tuple[str, str], ...]:
    """What defines a run's configuration: its pipeline and its params minus :data:`PLACE_KEYS`."""
    return tuple(sorted({**comparable(p.params), "pipeline": p.pipeline}.items()))


def config_groups(pipelines: Sequence[PipelineRecord]) -> list[ConfigGroup]:
    """Runs grouped by configuration, labelled A, B, ... in order of first appearance."""
    members: dict[tuple[tuple[str, str], ...], list[PipelineRecord]] = {}
    for p in pipelines:
        members.setdefault(identity(p), []).append(p)
    first = dict(next(iter(members), ()))
    groups = []
    for i, (ident, runs) in enumerate(members.items()):
        mine = dict(ident)
        changes = [f"{k}={mine.get(k, 'unset')}" for k in sorted(first.keys() | mine.keys())
                   if first.get(k) != mine.get(k)]
        groups.append(ConfigGroup(group_label(i), ", ".join(changes) or "-", tuple(runs)))
    return groups


def group_label(index: int) -> str:
    """A, B, ..., Z, AA, AB, ..."""
    label = ""
    index += 1
    while index:
        index, rest = divmod(index - 1, 26)
        label = chr(ord("A") + rest) + label
    return label


def mean_std(values: list[float], column: Column) -> str:
    """``mean ± std`` (sample standard deviation) in the column's unit; ``-`` if no run has the value."""
    if not values:
        return "-"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{column.show(statistics.mean(values))} ± {column.show(spread)}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def image(path: Path, title: str) -> str:
    """A Markdown image of the figure ``path``, which lies next to the Markdown file."""
    return f"![{title}]({path.name})"


def cell(text: str) -> str:
    """``text`` safe inside a Markdown table cell (one line, pipes escaped)."""
    return " ".join(str(text).split()).replace("|", "\\|")
