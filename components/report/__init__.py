"""``hpmkd report``: a Markdown report (``report.md`` plus PNG figures) built from the MLflow records alone.

Per experiment: the pipeline runs (and mean ± std over seeds of one configuration), accuracy against compression,
teacher weights and temperature over training, a stage timeline, and the runs that failed or were killed (see
:mod:`hpmkd.components.report.sections`). The report reads runs, metric histories and tags; it logs nothing back unless
``log=True``, which records the report as the artifacts of one run (tag ``kind=report``) per reported experiment.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from hpmkd.components.report.records import ExperimentRecords, load_experiments, open_store
from hpmkd.components.report.sections import SECTIONS, ReportContext

REPORT_FILE = "report.md"


def write_report(
    tracking_uri: str, out_dir: str | Path, experiments: list[str] | None = None, log: bool = False
) -> Path:
    """Write ``out_dir/report.md`` and its figures for ``experiments`` (default: every experiment with pipeline
    runs) from the store at ``tracking_uri``; return the report's path."""
    client = open_store(tracking_uri)
    records = load_experiments(client, experiments)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ctx = ReportContext(client, out)
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = ["# hpmkd report",
             f"From the MLflow store `{tracking_uri}`, {generated}: experiments "
             + ", ".join(f"`{r.name}`" for r in records) + "."]
    for exp in records:
        parts += experiment_part(exp, ctx)
    path = out / REPORT_FILE
    path.write_text("\n\n".join(parts) + "\n")
    if log:
        for exp in records:
            run = client.create_run(exp.experiment_id, run_name="report", tags={"kind": "report"})
            for file in (path, *ctx.figures):
                client.log_artifact(run.info.run_id, str(file), "report")
            client.set_terminated(run.info.run_id)
    return path


def experiment_part(exp: ExperimentRecords, ctx: ReportContext) -> list[str]:
    """The report's Markdown for one experiment: its heading and every section."""
    parts = [f"## Experiment `{exp.name}`"]
    if not exp.pipelines:
        return parts + ["No pipeline runs in this experiment."]
    for sec in SECTIONS:
        parts += [f"### {sec.title}", sec.render(exp, ctx)]
    return parts
