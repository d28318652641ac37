"""Tabular distillation measured: estimator teachers -> MLP students on several tables and seeds.

Per table and seed (splits fixed by the seed: 20 % test, then 20 % of the rest for validation), in this process
(hpmkd's library: the fit with out-of-fold outputs, the teacher-output cache entries, the training loop; no Ray, so
the numbers are the methods' and not the orchestration's):

* three teachers fitted on the training split (HistGradientBoosting, RandomForest, SVC): test ROC-AUC;
* the MLP student trained alone; distilled from each teacher, from the mean of the three (``mean_probs``) and with
  HPM-KD's recipe (a hand-given assistant MLP distilled first, then the student from the teachers and the assistant,
  attention-weighted, at a meta-learned temperature; the configuration manager's Ray Tune search is not run here),
  all from out-of-fold teacher outputs on the training rows (5 folds);
* the leak: the mean of the teachers in sample (no folds) against out of fold, for the student and for the teachers'
  training-row confidence (mean top probability);
* CPU latency per row at batch 1 (mean over 200 single rows) and per 1,000 rows, each teacher and the student, one
  thread, on the same machine in the same process.

Every student trains exactly alike (30 epochs, Adam 3e-3, cosine, batch 64, the epoch of best validation accuracy);
distillation is ``0.3 CE + 0.7 T² KL`` at T = 3 (TabTune's defaults). Test ROC-AUC is binary or macro one-vs-rest.

    python benchmarks/tabular.py [--seeds 0 1 2 3 4] [--tables breast_cancer wine ...] [--quick] [--out FILE]

Each (table, seed) is appended to ``<out>.jsonl`` as it finishes; a rerun with the same ``--out`` skips those.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.csv as pcsv
import torch
from scipy import stats

from hpmkd.components.logit_cache import CachedTeachers
from hpmkd.config import DataConfig, DistillConfig, TrainConfig
from hpmkd.data import load_dataset
from hpmkd.data.table import synthetic_table
from hpmkd.estimators import predict_log_proba
from hpmkd.logit_cache import CacheKey, write_entry
from hpmkd.models.ref import ModelRef
from hpmkd.oof import fit_teacher
from hpmkd.predictors import predictor_from_payload
from hpmkd.selection import selected_payload
from hpmkd.training import StageEnv, StageSpec, train_stage

ROOT = Path(__file__).resolve().parent.parent
TEACHERS = {"hgb": ("HistGradientBoostingClassifier", {"max_iter": 100, "learning_rate": 0.1}),
            "rf": ("RandomForestClassifier", {"n_estimators": 100}),
            "svc": ("SVC", {"C": 1.0})}
STUDENT = ModelRef("mlp", {"hidden": 64, "depth": 2, "dropout": 0.1})
ASSISTANT = ModelRef("mlp", {"hidden": 256, "depth": 2, "dropout": 0.1})
TRAIN = TrainConfig(epochs=30, batch_size=64, optimizer="adam", lr=3e-3, weight_decay=1e-4, lr_schedule="cosine")
KD = DistillConfig(ce_weight=0.3, methods={"kd": {"weight": 0.7}}, aggregator={"name": "mean_probs"},
                   temperature={"schedule": "fixed", "T": 3.0})
HPMKD = replace(KD, aggregator={"name": "attention"},
                temperature={"schedule": "meta", "T": 3.0, "T_min": 1.0, "T_max": 6.0})
FOLDS = 5


def tables(folder: Path) -> dict[str, DataConfig]:
    """The tables: bundled with scikit-learn (``digits`` only when asked: ten classes make its teachers slow), two
    synthetic, and a CSV with categorical columns and missing values read as a user's table."""
    csv = folder / "mixed.csv"
    pcsv.write_csv(synthetic_table(n_samples=1500, n_features=16, n_informative=8, n_classes=3, class_sep=0.8,
                                   categorical=4, missing=0.05, random_state=7), csv)
    return {
        "breast_cancer": DataConfig(name="breast_cancer"),
        "wine": DataConfig(name="wine"),
        "digits": DataConfig(name="digits"),
        "synthetic_binary": DataConfig(name="synthetic", options={"n_samples": 1500, "n_features": 20,
                                                                  "n_informative": 6, "class_sep": 0.7,
                                                                  "flip_y": 0.05, "random_state": 1}),
        "synthetic_5class": DataConfig(name="synthetic", options={"n_samples": 1500, "n_features": 20,
                                                                  "n_informative": 10, "n_classes": 5,
                                                                  "random_state": 2}),
        "csv_mixed": DataConfig(name="table", options={"path": str(csv), "target": "y",
                                                       "categorical": ["x12", "x13", "x14", "x15"]}),
    }


def entry(root: Path, name: str, log_probs: np.ndarray, tag: str) -> str:
    """A teacher-output cache entry for the training rows (what the pipeline's cache fill writes)."""
    key = CacheKey(weights=f"{name}:{tag}", model=name, data=tag, split="train", view="plain", dtype="float32")
    return str(write_entry(root, key, log_probs))


def student(data: DataConfig, seed: int, root: Path, outputs: dict[str, str] | None = None,
            distill: DistillConfig | None = None, model: ModelRef = STUDENT) -> tuple[dict[str, Any], Any]:
    """Train ``model`` alone or distilled from the stored ``outputs`` (teacher name -> cache entry); its result
    and selected payload."""
    states: list[dict[str, Any]] = []
    names = list(outputs or {})
    spec = StageSpec("bench", seed, replace(data, val_fraction=0.2), model, TRAIN, distill=distill if names else None,
                     teacher_names=names, teacher_models=[teacher_ref(n) for n in names])
    env = StageEnv(report=lambda m, s: states.append(s),
                   teachers=CachedTeachers(names, [[outputs[n] for n in names]]) if names else None)
    result = train_stage(spec, env)
    return result, selected_payload(states[-1])


def teacher_ref(name: str) -> ModelRef:
    return ModelRef(*TEACHERS[name]) if name in TEACHERS else ASSISTANT


def latency(predict: Any, rows: np.ndarray) -> tuple[float, float]:
    """(ms per row at batch 1, ms per 1,000 rows)."""
    singles = rows[:200]
    began = time.perf_counter()
    for i in range(len(singles)):
        predict(singles[i:i + 1])
    one = (time.perf_counter() - began) / len(singles) * 1e3
    thousand = np.resize(rows, (1000, *rows.shape[1:]))
    began = time.perf_counter()
    for _ in range(3):
        predict(thousand)
    return one, (time.perf_counter() - began) / 3 * 1e3


def run_one(data: DataConfig, seed: int, root: Path) -> dict[str, Any]:
    splits = load_dataset(data.name, **replace(data, val_fraction=0.2).loader_kwargs(seed))
    x, y = splits.train.x.numpy(), splits.train.y.numpy()
    began = time.perf_counter()
    out: dict[str, Any] = {"rows": len(splits.train), "classes": splits.num_classes,
                           "features": int(np.prod(splits.input_shape))}
    oof, in_sample, latencies = {}, {}, {}
    tag = f"{splits.fingerprint}"
    for name, (model, options) in TEACHERS.items():
        fitted = fit_teacher(model, options, x, y, fit="oof", folds=FOLDS, seed=seed, class_names=splits.class_names)
        test_lp = predict_log_proba(fitted.estimator, splits.test.x.numpy())
        out[f"teacher_{name}"] = auc(test_lp, splits.test.y.numpy())
        full = predict_log_proba(fitted.estimator, x)
        oof[name] = entry(root, name, fitted.train_outputs.log_probs, f"{tag}:oof")
        in_sample[name] = entry(root, name, full, f"{tag}:in")
        out[f"confidence_in_sample_{name}"] = float(np.exp(full.max(1)).mean())
        out[f"confidence_oof_{name}"] = float(np.exp(fitted.train_outputs.log_probs.max(1)).mean())
        latencies[name] = latency(lambda r, e=fitted.estimator: predict_log_proba(e, r), splits.test.x.numpy())
    out["alone"] = student(data, seed, root)[0]["test_auc"]
    for name in TEACHERS:
        out[f"kd_{name}"] = student(data, seed, root, {name: oof[name]}, KD)[0]["test_auc"]
    out["kd_mean"] = student(data, seed, root, oof, KD)[0]["test_auc"]
    out["kd_mean_in_sample"] = student(data, seed, root, in_sample, KD)[0]["test_auc"]
    out["kd_rf_in_sample"] = student(data, seed, root, {"rf": in_sample["rf"]}, KD)[0]["test_auc"]
    _, payload = student(data, seed, root, oof, HPMKD, model=ASSISTANT)
    assistant = predictor_from_payload(ASSISTANT, splits.shape, payload).eval()
    with torch.no_grad():
        assistant_lp = torch.log_softmax(assistant(splits.train.x), -1).numpy()
    with_assistant = {**oof, "assistant": entry(root, "assistant", assistant_lp, f"{tag}:a{seed}")}
    out["hpmkd"] = student(data, seed, root, with_assistant, HPMKD)[0]["test_auc"]
    net = STUDENT.build(splits.shape).eval()

    def student_predict(rows: np.ndarray) -> None:
        with torch.no_grad():
            net(torch.from_numpy(rows))

    latencies["student"] = latency(student_predict, splits.test.x.numpy())
    out["latency"] = latencies
    out["wall_s"] = time.perf_counter() - began
    return out


def auc(log_probs: np.ndarray, y: np.ndarray) -> float:
    from hpmkd.evaluation import Predictions
    from hpmkd.metrics import auc as roc_auc

    return roc_auc(Predictions(torch.from_numpy(log_probs), torch.from_numpy(y)))["auc"]


def mean_std(values: list[float], digits: int = 4) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {spread:.{digits}f}"


def paired(a: list[float], b: list[float]) -> str:
    """``mean difference (wins/n, paired t-test p)`` of ``a`` over ``b``."""
    diff = [p - q for p, q in zip(a, b)]
    p = stats.ttest_rel(a, b).pvalue if len(a) > 1 and any(diff) else float("nan")
    return f"{statistics.mean(diff):+.4f} ({sum(d > 0 for d in diff)}/{len(diff)}, p={p:.2f})"


def report(results: dict[str, list[dict[str, Any]]], seeds: list[int], wall_s: float) -> str:
    students = ["alone", *(f"kd_{t}" for t in TEACHERS), "kd_mean", "hpmkd"]
    computed = sum(r.get("wall_s", 0.0) for runs in results.values() for r in runs) or wall_s
    lines = [f"Seeds {seeds}; {computed / 60:.1f} min of computing on the 2-core CPU machine, shared with other jobs "
             "(latencies are ratios measured side by side in one process). Test ROC-AUC, mean ± std over seeds.\n",
             "| table | rows (train) | classes | " + " | ".join(f"teacher {t}" for t in TEACHERS) + " | "
             + " | ".join(students) + " |", "|" + "---|" * (3 + len(TEACHERS) + len(students))]
    retention, beats, ratio_rows = [], [], []
    for table, runs in results.items():
        col = lambda k: [r[k] for r in runs]  # noqa: E731
        lines.append(f"| {table} | {runs[0]['rows']} | {runs[0]['classes']} | "
                     + " | ".join(mean_std(col(f"teacher_{t}")) for t in TEACHERS) + " | "
                     + " | ".join(mean_std(col(s)) for s in students) + " |")
    lines += ["", "AUC retention (student / best teacher's test AUC, per seed then averaged) and the paired "
              "difference against the student alone (wins over seeds, paired t-test p):", "",
              "| table | retention kd_mean | retention hpmkd | best single-teacher KD − alone | kd_mean − alone | "
              "hpmkd − alone | kd_mean − best single-teacher KD |", "|---|---|---|---|---|---|---|"]
    for table, runs in results.items():
        best = [max(r[f"teacher_{t}"] for t in TEACHERS) for r in runs]
        best_kd = [max(r[f"kd_{t}"] for t in TEACHERS) for r in runs]
        alone, mean_kd, hp = ([r[k] for r in runs] for k in ("alone", "kd_mean", "hpmkd"))
        r_mean = statistics.mean(m / b for m, b in zip(mean_kd, best))
        r_hp = statistics.mean(h / b for h, b in zip(hp, best))
        retention.append(r_mean)
        beats.append(statistics.mean(mean_kd) > statistics.mean(alone))
        lines.append(f"| {table} | {r_mean:.3f} | {r_hp:.3f} | {paired(best_kd, alone)} | {paired(mean_kd, alone)} | "
                     f"{paired(hp, alone)} | {paired(mean_kd, best_kd)} |")
    lines += ["", f"Average retention of the mean-teacher student: {statistics.mean(retention):.3f}; it beats the "
              f"student alone (mean AUC) on {sum(beats)}/{len(beats)} tables.", "",
              "The leak: the mean teacher in sample (no folds) against out of fold, for the student; and the "
              "teachers' mean top probability on the training rows:", "",
              "| table | kd_mean OOF | kd_mean in-sample | OOF − in-sample | kd_rf OOF | kd_rf in-sample | "
              "confidence hgb in / OOF | rf in / OOF | svc in / OOF |", "|---|---|---|---|---|---|---|---|---|"]
    for table, runs in results.items():
        col = lambda k: [r[k] for r in runs]  # noqa: E731
        conf = " | ".join(f"{statistics.mean(col(f'confidence_in_sample_{t}')):.3f} / "
                          f"{statistics.mean(col(f'confidence_oof_{t}')):.3f}" for t in TEACHERS)
        lines.append(f"| {table} | {mean_std(col('kd_mean'))} | {mean_std(col('kd_mean_in_sample'))} | "
                     f"{paired(col('kd_mean'), col('kd_mean_in_sample'))} | {mean_std(col('kd_rf'))} | "
                     f"{mean_std(col('kd_rf_in_sample'))} | {conf} |")
    lines += ["", "CPU latency (one thread; ms per row at batch 1 / ms per 1,000 rows), mean over seeds, and each "
              "teacher's over the student's:", "",
              "| table | student | " + " | ".join(TEACHERS) + " | " + " | ".join(f"{t} / student (batch 1, 1k)"
                                                                         for t in TEACHERS) + " |",
              "|" + "---|" * (2 + 2 * len(TEACHERS))]
    for table, runs in results.items():
        lat = {k: [statistics.mean(r["latency"][k][i] for r in runs) for i in (0, 1)] for k in [*TEACHERS, "student"]}
        ratio_rows.append(min(lat[t][0] / lat["student"][0] for t in TEACHERS))
        lines.append(f"| {table} | {lat['student'][0]:.3f} / {lat['student'][1]:.2f} | "
                     + " | ".join(f"{lat[t][0]:.3f} / {lat[t][1]:.2f}" for t in TEACHERS) + " | "
                     + " | ".join(f"{lat[t][0] / lat['student'][0]:.0f}× / {lat[t][1] / lat['student'][1]:.0f}×"
                                  for t in TEACHERS) + " |")
    lines += ["", f"Smallest teacher/student latency ratio at batch 1 over the tables: {min(ratio_rows):.0f}×."]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--tables", nargs="+", help="default: all but digits")
    ap.add_argument("--quick", action="store_true", help="two tables, seed 0 (a smoke check)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "tabular_results.md"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    began = time.perf_counter()
    rows_file = Path(args.out).with_suffix(".jsonl")  # one line per (table, seed): a rerun skips what is there
    done = {(r["table"], r["seed"]): r for r in map(json.loads, rows_file.read_text().splitlines())} \
        if rows_file.is_file() else {}
    with tempfile.TemporaryDirectory() as folder:
        configs = tables(Path(folder))
        chosen = args.tables or (["breast_cancer", "wine"] if args.quick else [t for t in configs if t != "digits"])
        seeds = [0] if args.quick else args.seeds
        results: dict[str, list[dict[str, Any]]] = {}
        for table in chosen:
            for seed in seeds:
                if (table, seed) not in done:
                    done[(table, seed)] = {"table": table, "seed": seed,
                                           **run_one(configs[table], seed, Path(folder) / "cache")}
                    with rows_file.open("a") as fh:
                        fh.write(json.dumps(done[(table, seed)]) + "\n")
                results.setdefault(table, []).append(done[(table, seed)])
                print(table, seed, flush=True)
    text = report(results, seeds, time.perf_counter() - began)
    Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
