"""The user's tables (CSV / Parquet through pyarrow), synthetic tables, preprocessing fitted on the training rows
only, and the errors a bad table gives before anything runs (no Ray)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest
import torch

from hpmkd.config import config_from_data
from hpmkd.data import load_dataset
from hpmkd.data.loading import data_shape
from hpmkd.data.table import TablePreprocessing, synthetic_table
from hpmkd.registry import ConfigError

ROWS = 60


def mixed_table() -> pa.Table:
    """Numeric, categorical (strings) and a missing value in each, a string target."""
    rng = np.random.default_rng(0)
    age = rng.normal(40, 10, ROWS).round(1)
    income = rng.normal(3000, 500, ROWS).round(0)
    colour = rng.choice(["red", "green", "blue"], ROWS).tolist()
    label = np.where(age + rng.normal(0, 5, ROWS) > 40, "yes", "no").tolist()
    age_mask = np.zeros(ROWS, bool)
    age_mask[3] = True
    colour[5] = None
    return pa.table({"age": pa.array(age, mask=age_mask), "income": income, "colour": colour,
                     "id": np.arange(ROWS), "label": label})


def options(path, **extra):
    return {"path": str(path), "target": "label", "categorical": ["colour"], "drop": ["id"], **extra}


def test_csv_and_parquet_with_a_category_and_missing_values_give_the_same_tensors(tmp_path):
    table = mixed_table()
    pcsv.write_csv(table, tmp_path / "t.csv")
    pq.write_table(table, tmp_path / "t.parquet")
    a = load_dataset("table", options=options(tmp_path / "t.csv"), seed=3)
    b = load_dataset("table", options=options(tmp_path / "t.parquet"), seed=3)
    for split in ("train", "val", "test"):
        torch.testing.assert_close(getattr(a, split).x, getattr(b, split).x, rtol=0, atol=0)
        torch.testing.assert_close(getattr(a, split).y, getattr(b, split).y, rtol=0, atol=0)
    assert a.class_names == ["no", "yes"] and a.input_shape == (5,)  # age, income, 3 colours; id dropped
    assert a.preprocessing == b.preprocessing
    assert torch.isfinite(a.train.x).all()
    # the row with a missing colour is all zeros in the colour block; every other row has exactly one colour
    every = np.concatenate([s.x.numpy() for s in (a.train, a.val, a.test)])
    assert sorted(np.unique(every[:, 2:].sum(1)).tolist()) == [0.0, 1.0]
    assert (every[:, 2:].sum(1) == 0).sum() == 1


def test_preprocessing_statistics_come_from_the_training_rows_only(tmp_path):
    table = mixed_table()
    pcsv.write_csv(table, tmp_path / "t.csv")
    splits = load_dataset("table", options=options(tmp_path / "t.csv"), seed=1)
    # rebuild the training rows' raw values by hand from the split indices the loader used
    from hpmkd.data.splits import split_indices

    y = np.array([0 if v == "no" else 1 for v in table.column("label").to_pylist()])
    idx = split_indices(y, None, seed=1, val_fraction=0.1, test_fraction=0.2, max_train=None, max_val=None,
                        max_test=None)
    age = np.array([np.nan if v is None else v for v in table.column("age").to_pylist()])[idx.train]
    fill = np.nanmedian(age)
    imputed = np.where(np.isnan(age), fill, age)
    record = {c["name"]: c for c in splits.preprocessing["columns"]}
    assert record["age"]["fill"] == pytest.approx(fill)
    assert record["age"]["mean"] == pytest.approx(imputed.mean())
    assert record["age"]["std"] == pytest.approx(imputed.std())
    assert splits.train.x[:, 0].mean().item() == pytest.approx(0.0, abs=1e-5)
    # changing rows outside the training split changes none of the statistics nor the training tensors
    held_out = np.concatenate([idx.val, idx.test])
    ages = table.column("age").to_pylist()
    for i in held_out:
        ages[i] = 1e6
    changed = table.set_column(0, "age", pa.array(ages, pa.float64()))
    pcsv.write_csv(changed, tmp_path / "changed.csv")
    other = load_dataset("table", options=options(tmp_path / "changed.csv"), seed=1)
    assert {c["name"]: c for c in other.preprocessing["columns"]}["age"] == record["age"]
    torch.testing.assert_close(other.train.x, splits.train.x, rtol=0, atol=0)


def test_raw_rows_encode_to_the_loader_tensors(tmp_path):
    table = mixed_table()
    pcsv.write_csv(table, tmp_path / "t.csv")
    splits = load_dataset("table", options={**options(tmp_path / "t.csv"), "test_path": str(tmp_path / "t.csv")},
                          seed=0)
    prep = TablePreprocessing.from_record(splits.preprocessing)
    torch.testing.assert_close(torch.from_numpy(prep.encode(table.to_pandas())), splits.test.x, rtol=0, atol=0)
    # a level the training rows never had, or one the file does not have, encodes as zeros
    unseen = prep.encode({"age": [40.0], "income": [3000.0], "colour": ["purple"]})
    assert unseen[0, 2:].sum() == 0


def test_synthetic_tables_are_fixed_by_their_seed_and_take_categories_and_missing_values():
    opts = {"n_samples": 300, "n_features": 6, "n_informative": 3, "categorical": 2, "missing": 0.1,
            "random_state": 4}
    a, b = load_dataset("synthetic", options=opts), load_dataset("synthetic", options=opts)
    torch.testing.assert_close(a.train.x, b.train.x, rtol=0, atol=0)
    assert a.fingerprint == b.fingerprint
    assert a.input_shape == (4 + 2 * 4,)  # 4 numeric + 2 categorical of 4 levels
    other = load_dataset("synthetic", options={**opts, "random_state": 5})
    assert not torch.equal(a.train.x, other.train.x)
    assert data_shape("synthetic", options=opts) == (2, (12,))


def tabular_config(data: dict, **extra) -> dict:
    return {"experiment": "t", "pipeline": "kd", "data": data,
            "teachers": [{"name": "rf", "model": "RandomForestClassifier", "options": {"n_estimators": 5}}],
            "student": {"model": "mlp", "options": {"hidden": 8, "depth": 1}}, **extra}


def test_a_missing_target_column_is_named_before_anything_runs(tmp_path):
    pcsv.write_csv(mixed_table(), tmp_path / "t.csv")
    with pytest.raises(ConfigError, match=r"data.options.target: the table has no column 'labl'.*Did you mean 'label'"):
        config_from_data(tabular_config({"name": "table", "options": {"path": str(tmp_path / "t.csv"),
                                                                      "target": "labl"}}))


def test_non_numeric_values_in_a_numeric_column_are_named_with_their_rows(tmp_path):
    table = mixed_table()
    income = table.column("income").to_pylist()
    income[7] = "n/a?"
    pcsv.write_csv(table.set_column(1, "income", pa.array([str(v) for v in income])), tmp_path / "t.csv")
    with pytest.raises(ConfigError, match=r"column 'income' is numeric .* 'n/a\?' \(row 7\).*data.options.categorical"):
        config_from_data(tabular_config({"name": "table", "options": options(tmp_path / "t.csv")}))
    # the colour column not declared categorical: its strings are named too
    with pytest.raises(ConfigError, match=r"column 'colour' is numeric .*'(red|green|blue)' \(row 0\)"):
        load_dataset("table", options={"path": str(tmp_path / "t.csv"), "target": "label", "drop": ["income"]})


def test_a_class_with_fewer_training_rows_than_folds_is_named(tmp_path):
    table = mixed_table()
    labels = ["rare" if i < 4 else v for i, v in enumerate(table.column("label").to_pylist())]
    pcsv.write_csv(table.set_column(4, "label", pa.array(labels)), tmp_path / "t.csv")
    with pytest.raises(ConfigError, match=r"tabular.folds: .*class 'rare' \(\d rows\) has fewer rows than the 5 folds"):
        config_from_data(tabular_config({"name": "table", "options": options(tmp_path / "t.csv")}))
    # with in-sample teacher outputs there are no folds to fill
    config_from_data(tabular_config({"name": "table", "options": options(tmp_path / "t.csv")},
                                    tabular={"teacher_fit": "in_sample"}))


def test_relative_table_paths_are_made_absolute_when_the_config_is_read(tmp_path, monkeypatch):
    pcsv.write_csv(mixed_table(), tmp_path / "t.csv")
    monkeypatch.chdir(tmp_path)
    cfg = config_from_data(tabular_config({"name": "table", "options": options("t.csv")}))
    assert cfg.data.options["path"] == str(tmp_path / "t.csv")


def test_an_unknown_file_type_and_a_missing_file_are_errors(tmp_path):
    (tmp_path / "t.xlsx").write_text("x")
    with pytest.raises(ConfigError, match="neither a CSV"):
        load_dataset("table", options={"path": str(tmp_path / "t.xlsx"), "target": "y"})
    with pytest.raises(ConfigError, match="does not exist"):
        load_dataset("table", options={"path": str(tmp_path / "none.csv"), "target": "y"})


def test_synthetic_table_writes_a_round_tripping_csv(tmp_path):
    pcsv.write_csv(synthetic_table(n_samples=200, n_features=5, n_informative=3, categorical=1, random_state=1),
                   tmp_path / "s.csv")
    from_file = load_dataset("table", options={"path": str(tmp_path / "s.csv"), "target": "y", "categorical": ["x4"]})
    direct = load_dataset("synthetic", options={"n_samples": 200, "n_features": 5, "n_informative": 3,
                                                "categorical": 1, "random_state": 1})
    torch.testing.assert_close(from_file.train.x, direct.train.x)
