"""The issue-17 comparison table of ``benchmarks/hpmkd_vs_baselines.py``: paired differences and t-tests, and each
target met or missed, computed from the rows as a reader would by hand."""

from __future__ import annotations

import importlib.util
import itertools
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient
from scipy import stats

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
TEACHER, TEACHER_PARAMS, STUDENT_PARAMS = 0.8947, 103_466, 2_810
EXPERIMENT = "fashion-mnist-hpmkd"  # conf/default.yaml's


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the benchmark imports its sibling kd_vs_alone
    spec = importlib.util.spec_from_file_location("hpmkd_vs_baselines", BENCHMARKS / "hpmkd_vs_baselines.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # its dataclasses resolve their annotations there
    spec.loader.exec_module(module)
    return module


def rows_of(bench, **tests: list[float]) -> dict:
    return {label: [bench.Row(t, STUDENT_PARAMS, TEACHER, TEACHER_PARAMS) for t in values]
            for label, values in tests.items()}


def targets(lines: list[str]) -> dict[str, tuple[str, str]]:
    """The targets table: target -> (measured, ``met`` or ``**missed**``)."""
    start = lines.index("| target | measured | |") + 2
    table = itertools.takewhile(lambda line: line.startswith("| "), lines[start:])
    cells = [line.removeprefix("| ").removesuffix(" |").split(" | ") for line in table]
    return {target: (measured, verdict) for target, measured, verdict in cells}


def test_the_table_pairs_by_seed_and_says_which_targets_are_met(bench):
    hpmkd = [0.870, 0.868, 0.872, 0.869, 0.871]
    alone = [0.860, 0.861, 0.873, 0.858, 0.859]  # HPM-KD better in 4 of 5 seeds
    kd = [0.866, 0.867, 0.869, 0.862, 0.868]
    lines = bench.markdown(rows_of(bench, **{bench.HPMKD: hpmkd, bench.ALONE: alone, bench.PLAIN_KD: kd}),
                           [0, 1, 2, 3, 4])
    p = stats.ttest_rel(hpmkd, alone).pvalue
    gain = next(line for line in lines if line.startswith("HPM-KD − student alone"))
    assert "better in 4/5 seeds" in gain and f"p = {p:.3f}" in gain
    assert "+1.00, +0.70, -0.10, +1.10, +1.20" in gain
    kd_row = next(line for line in lines if line.startswith(f"| {bench.PLAIN_KD} |"))
    assert f"| {stats.ttest_rel(kd, hpmkd).pvalue:.3f} | 0/5 |" in kd_row  # the row minus HPM-KD: never better
    met = targets(lines)
    gap = sum(TEACHER - a for a in alone) / 5 * 100  # 3.25 points
    assert met["best teacher ≥ 3 points above the student alone"] == (f"+{gap:.2f} points", "met")
    assert met["HPM-KD beats the student alone in ≥ 80% of seeds"] == ("4/5", "met")
    assert met["HPM-KD beats plain KD on the mean"] == ("+0.36 points", "met")
    retention = sum(hpmkd) / 5 / TEACHER
    assert met["retention ≥ 0.97 at ≥ 10× compression"] == (f"{retention:.3f} at 36.8×", "met")


def test_a_missed_target_is_reported_as_missed(bench):
    hpmkd = [0.860, 0.861, 0.862]  # retention 0.962; loses to plain KD and to the student alone in 2 of 3
    alone = [0.866, 0.855, 0.868]
    lines = bench.markdown(rows_of(bench, **{bench.HPMKD: hpmkd, bench.ALONE: alone}), [0, 1, 2])
    met = targets(lines)
    assert met["HPM-KD beats the student alone in ≥ 80% of seeds"] == ("1/3", "**missed**")
    assert met["HPM-KD beats plain KD on the mean"] == ("not run", "**missed**")
    assert met["retention ≥ 0.97 at ≥ 10× compression"][1] == "**missed**"
    assert met["best teacher ≥ 3 points above the student alone"][1] == "met"


def record(uri: str, seed: int, tags: dict[str, str], students: dict[str, float], status: str = "FINISHED") -> None:
    """A pipeline run of the default's experiment as the runner records it: a parent tagged ``kind=pipeline``
    with its seed, and nested stage runs (tag ``stage``) with ``test_acc`` and ``params``: the CNN teacher and
    ``students`` (stage -> test accuracy)."""
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    artifacts = Path(uri.removeprefix("sqlite:///")).with_suffix("").as_uri()  # beside the store, not in the cwd
    exp_id = exp.experiment_id if exp else client.create_experiment(EXPERIMENT, artifact_location=artifacts)
    parent = client.create_run(exp_id, tags={"kind": "pipeline", "seed": str(seed), **tags}).info.run_id
    for stage, (acc, params) in {"teacher_cnn": (TEACHER, TEACHER_PARAMS),
                                 **{s: (a, STUDENT_PARAMS) for s, a in students.items()}}.items():
        child = client.create_run(exp_id, tags={"mlflow.parentRunId": parent, "stage": stage}).info.run_id
        client.log_metric(child, "test_acc", acc)
        client.log_metric(child, "params", params)
        client.set_terminated(child)
    client.set_terminated(parent, status)


def test_collect_builds_the_table_from_one_fresh_store_per_seed(bench, tmp_path, capsys, monkeypatch):
    """Seeds 0 and 1 in two stores; a failed run, an ablation variant and a seed without HPM-KD are left out."""
    stores = [f"sqlite:///{tmp_path / f's{seed}.db'}" for seed in (0, 1)]
    for seed, uri in enumerate(stores):
        record(uri, seed, {"baseline": bench.PLAIN_KD, "pipeline": "kd"}, {"distill": 0.861 + seed / 1000})
        record(uri, seed, {"pipeline": "hpmkd"}, {"distill": 0.870 + seed / 1000, "student_alone": 0.860})
    record(stores[0], 0, {"pipeline": "hpmkd"}, {"distill": 0.5, "student_alone": 0.5}, status="FAILED")
    record(stores[0], 0, {"pipeline": "hpmkd", "ablation_variant": "no_chain"}, {"distill": 0.5, "student_alone": 0.5})
    record(stores[1], 2, {"baseline": bench.PLAIN_KD, "pipeline": "kd"}, {"distill": 0.9})  # no HPM-KD for seed 2
    out = tmp_path / "table.md"
    monkeypatch.setattr(sys, "argv", ["hpmkd_vs_baselines.py", "--collect", *stores, "--rows", bench.PLAIN_KD,
                                      "--out", str(out)])
    bench.main()
    lines = out.read_text().splitlines()
    assert lines[0].startswith("Test accuracy %, mean ± std over seeds 0, 1.")
    assert "| **HPM-KD (full)** | 87.05 ± 0.07 |" in out.read_text()
    assert f"| {bench.PLAIN_KD} | 86.15 ± 0.07 | -0.90 ± 0.00 |" in out.read_text()
    assert targets(lines)["HPM-KD beats the student alone in ≥ 80% of seeds"] == ("2/2", "met")
    assert capsys.readouterr().out.splitlines()[-1] == "hpmkd_minus_best_baseline=0.90"
