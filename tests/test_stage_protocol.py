"""The stage protocol (hpmkd.components.stages.base) with a real MLflow store and a stage kind registered by the test:
typed params and settings, the content key, reuse of the typed artifact and record, and why a run is not reused."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from hpmkd.checkpoint import file_digest
from hpmkd.components.graph import ModelArtifact, Stage, StageOutcome, StageParams, StageResult
from hpmkd.components.stages import base
from hpmkd.components.tracking import Tracker
from hpmkd.config import load_config
from hpmkd.data import load_dataset
from hpmkd.models.ref import ModelRef

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Noted:
    """The probe kind's record."""

    note: str
    count: int


@dataclass(frozen=True)
class Probe(StageParams):
    kind = "probe"
    width: int
    teachers: tuple[str, ...] = ()


class ProbeKind(base.StageKind):
    """Writes a model of ``width`` units, counts its runs, records a note."""

    record_type = Noted
    runs = 0

    def run(self, stage, ctx, inputs, run) -> StageOutcome:
        ProbeKind.runs += 1
        model = ModelRef("mlp", {"hidden": stage.params.width, "depth": 1})
        path = ctx.out_dir / stage.name / "model.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        torch.save(model.build(ctx.splits.shape).state_dict(), path)
        ctx.tracker.log_artifact(run.run_id, path, "checkpoint")
        artifact = ModelArtifact(stage.name, model, str(path), file_digest(path), stage.params.width, {"val_acc": 0.5})
        return StageOutcome({"val_acc": 0.5}, artifact, Noted(f"read {list(inputs)}", len(inputs)))


@pytest.fixture
def ctx(tracking_uri, tmp_path, monkeypatch):
    monkeypatch.setitem(base.STAGE_KINDS._entries, "probe", ProbeKind)
    ProbeKind.runs = 0
    cfg = load_config(ROOT / "conf" / "smoke.yaml", ["data={name: digits}", f"output_dir={tmp_path}"])
    tracker = Tracker(tracking_uri, "protocol")
    splits = load_dataset("digits", **cfg.data.loader_kwargs(0))
    parent = tracker.start_run("parent", {"kind": "pipeline"})
    return base.ExperimentContext(cfg, tracker, parent, splits, str(tmp_path / "ray"), tmp_path / "out")


def run(ctx, stage: Stage, inputs: dict[str, StageResult] | None = None) -> StageResult:
    return base.execute(stage, ctx, inputs or {})


def test_a_finished_stage_is_reused_with_its_typed_artifact_and_record(ctx):
    first = run(ctx, Stage("probe", Probe(8)))
    again = run(ctx, Stage("probe", Probe(8)))
    assert ProbeKind.runs == 1 and again.reused and again.key == first.key
    assert isinstance(again.record, Noted) and again.record == first.record
    assert isinstance(again.artifact.model, ModelRef) and again.artifact.model == first.artifact.model
    assert again.artifact.digest == file_digest(again.artifact.path) == first.artifact.digest
    params = ctx.tracker.client.get_run(again.run_id).data.params
    assert params["width"] == "8" and params["seed"] == "0" and params["data.name"] == "digits"


def test_the_key_follows_the_settings_and_the_inputs(ctx):
    one = run(ctx, Stage("probe", Probe(8)))
    wider = run(ctx, Stage("probe", Probe(9)))
    assert wider.key != one.key and not wider.reused
    downstream = run(ctx, Stage("reader", Probe(4, ("probe",)), deps=["probe"]), {"probe": one})
    other_input = run(ctx, Stage("reader", Probe(4, ("probe",)), deps=["probe"]), {"probe": wider})
    assert other_input.key != downstream.key and ProbeKind.runs == 4


def test_a_run_that_is_not_reused_says_why(ctx, monkeypatch):
    first = run(ctx, Stage("probe", Probe(8)))
    tags = lambda r: ctx.tracker.client.get_run(r.run_id).data.tags  # noqa: E731
    assert "not_reused" not in tags(first)  # nothing earlier
    wider = run(ctx, Stage("probe", Probe(12)))
    assert f"run {first.run_id} had other settings (width)" in tags(wider)["not_reused"]
    monkeypatch.setattr(base, "code_version", lambda: "f00dfeedcafe")
    changed = run(ctx, Stage("probe", Probe(12)))
    why = tags(changed)["not_reused"]
    assert "code version" in why and "this is f00dfeedcafe" in why and "code that computes results changed" in why
    assert tags(changed)["code_version"] == "f00dfeedcafe" and ProbeKind.runs == 3
