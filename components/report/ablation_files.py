"""An ablation table (:class:`hpmkd.components.report.ablation.AblationTable`) as files: Markdown (the table and one
sentence per component on what the data show), CSV (one row per variant), JSON (everything, per seed) and two
figures (test accuracy per variant; paired differences against the full pipeline per seed).
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from hpmkd.components.report import plots
from hpmkd.components.report.ablation import (ALPHA, CONSTANT, FULL, HELPS, HURTS, NO_DIFFERENCE, NO_SIGNIFICANT, UNTESTED,
                                        AblationTable, Estimate, VariantRow)
from hpmkd.components.report.plots import Spread
from hpmkd.components.report.tables import image, markdown_table

MARKDOWN, CSV, JSON = "ablation.md", "ablation.csv", "ablation.json"
ACCURACY_FIGURE, DIFFERENCE_FIGURE = "ablation_accuracy", "ablation_differences"
MAX_ERROR_CHARS = 300
CSV_FIELDS = ("variant", "removed", "seeds", "test_acc_mean", "test_acc_std", "retention_mean", "retention_std",
              "wall_s_mean", "wall_s_std", "pairs", "diff_mean", "diff_std", "t", "p", "verdict")

#: the sentence for each verdict; ``{c}`` the component, ``{d}`` mean ± std of the differences, ``{n}`` the pairs
SENTENCES = {
    HELPS: "**{c}** helps: without it the student's test accuracy changes by {d} points over {n} paired seeds "
           "(paired t-test p = {p}, significant at p < {alpha}).",
    HURTS: "**{c}** hurts: without it the student's test accuracy changes by {d} points over {n} paired seeds "
           "(paired t-test p = {p}, significant at p < {alpha}).",
    NO_SIGNIFICANT: "**{c}**: no significant difference at p < {alpha}: without it the student's test accuracy "
                    "changes by {d} points over {n} paired seeds (paired t-test p = {p}).",
    NO_DIFFERENCE: "**{c}**: no difference: without it the student's test accuracy is identical in each of {n} "
                   "paired seeds (nothing to test).",
    CONSTANT: "**{c}**: without it the student's test accuracy changes by the same {d} points in each of {n} paired "
              "seeds; with no spread the paired t-test is undefined, so no significance is claimed.",
    UNTESTED: "**{c}**: not testable yet: {n} paired seed(s) with the full pipeline, and the paired t-test needs at "
              "least 2.",
}


def points(estimate: Estimate | None, scale: float = 100.0, digits: int = 2, sign: str = "") -> str:
    """``mean ± std`` in display units (``-`` without values; the mean alone with one value)."""
    if estimate is None:
        return "-"
    mean = f"{estimate.mean * scale:{sign}.{digits}f}"
    return mean if estimate.std is None else f"{mean} ± {estimate.std * scale:.{digits}f}"


def number(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}g}"


def sentence(row: VariantRow) -> str:
    test = row.paired
    return SENTENCES[test.verdict].format(c=row.component, d=points(test.difference, sign="+"),
                                          n=len(test.differences), p=number(test.p), alpha=ALPHA)


def table_markdown(table: AblationTable) -> str:
    """The table: per variant, its seeds, test accuracy, retention and wall time (mean ± std), and for a removal the
    paired difference against the full pipeline with the paired t-test."""
    rows = []
    for row in table.variants:
        test = row.paired
        rows.append([row.name, row.component or "-", ", ".join(r.seed for r in row.results) or "-",
                     points(row.test_acc), points(row.retention, 1, 3), points(row.wall_s, 1, 1),
                     "-" if test is None else points(test.difference, sign="+"),
                     "-" if test is None else str(len(test.differences)),
                     "-" if test is None else number(test.t), "-" if test is None else number(test.p),
                     "-" if test is None else test.verdict])
    return markdown_table(["variant", "removed", "seeds", "student test acc (%)", "retention", "wall (s)",
                           "Δ test acc vs full (points)", "pairs", "t", "p", "verdict"], rows)


def ablation_markdown(table: AblationTable, figures: dict[str, Path]) -> str:
    """The ablation's Markdown (no heading): what was compared, the table, a sentence per component, the figures
    (title -> path, next to the Markdown file) and the (variant, seed) pairs without a finished run."""
    removals = [row for row in table.variants if row.paired is not None]
    parts = [f"Ablation `{table.ablation_id}` in experiment `{table.experiment}`: the {FULL} pipeline and "
             f"{len(removals)} single-component removal(s) over seeds {', '.join(table.seeds)}; per variant and seed "
             "the newest finished pipeline run counts. Mean ± sample std over seeds; Δ = removal − full in the same "
             f"seed, tested with a two-sided paired t-test (significance at p < {ALPHA}; n/a with fewer than 2 pairs "
             "or no spread).",
             table_markdown(table)]
    if removals:
        parts.append("What the data show:\n\n" + "\n".join(f"- {sentence(row)}" for row in removals))
    parts += [image(path, title) for title, path in figures.items()]
    if table.unfinished:
        parts.append("Without a finished run (left out of the numbers above):\n\n" + markdown_table(
            ["variant", "seed", "status", "run", "error"],
            [[u.variant, u.seed, u.status, u.run_id or "-", clip(u.error)] for u in table.unfinished]))
    return "\n\n".join(parts)


def clip(error: str | None) -> str:
    if error is None:
        return "-"
    return error if len(error) <= MAX_ERROR_CHARS else error[:MAX_ERROR_CHARS] + "…"


def draw(table: AblationTable, path_for: Callable[[str], Path]) -> dict[str, Path]:
    """The figures (title -> path) of ``table``; ``path_for(name)`` says where figure ``name`` goes. A figure with
    no data is not drawn."""
    figures = {}
    accuracy = [Spread(row.name, {r.seed: r.test_acc * 100 for r in row.results}) for row in table.variants if row.results]
    if accuracy:
        figures["student test accuracy per variant"] = plots.spreads(
            accuracy, path_for(ACCURACY_FIGURE), "student test accuracy (%)")
    differences = [Spread(row.name, {s: d * 100 for s, d in zip(row.paired.seeds, row.paired.differences)})
                   for row in table.variants if row.paired is not None and row.paired.differences]
    if differences:
        figures["paired differences against the full pipeline, per seed"] = plots.spreads(
            differences, path_for(DIFFERENCE_FIGURE), "Δ test accuracy vs full (points)", reference=0.0)
    return figures


def csv_rows(table: AblationTable) -> list[dict[str, object]]:
    """One row per variant (accuracies and differences as fractions; empty where not defined)."""
    rows = []
    for row in table.variants:
        test = row.paired
        values = {"variant": row.name, "removed": row.component, "seeds": " ".join(r.seed for r in row.results),
                  "pairs": None if test is None else len(test.differences),
                  "t": test and test.t, "p": test and test.p, "verdict": test and test.verdict}
        for name, est in (("test_acc", row.test_acc), ("retention", row.retention), ("wall_s", row.wall_s),
                          ("diff", test and test.difference)):
            values |= {f"{name}_mean": est and est.mean, f"{name}_std": est and est.std}
        rows.append({k: "" if v is None else v for k, v in values.items()})
    return rows


def write_ablation(table: AblationTable, out_dir: str | Path) -> list[Path]:
    """Write ``ablation.md``, ``ablation.csv``, ``ablation.json`` and the figures into ``out_dir``; return their
    paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures = draw(table, lambda name: out / f"{name}.png")
    md = out / MARKDOWN
    md.write_text(f"# Ablation `{table.ablation_id}`\n\n{ablation_markdown(table, figures)}\n")
    with (out / CSV).open("w", newline="") as fh:
        writer = csv.DictWriter(fh, CSV_FIELDS)
        writer.writeheader()
        writer.writerows(csv_rows(table))
    (out / JSON).write_text(json.dumps({"alpha": ALPHA, **asdict(table)}, indent=2))
    return [md, out / CSV, out / JSON, *figures.values()]
