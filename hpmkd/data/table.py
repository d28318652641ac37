"""The user's own tables (``data.name: table``) and synthetic tables (``data.name: synthetic``).

``table`` reads a CSV or Parquet file with pyarrow (``data.options``: ``path``, ``target``, optional
``categorical`` and ``drop`` column lists, and ``test_path`` for a separate test file; otherwise 20 % of the rows
are held out, stratified and fixed by the seed). Every column that is neither the target, categorical nor dropped
is numeric: a value that is not a number there is an error naming the column, its first bad values and their rows.
The classes are the target's distinct values (sorted; numbers numerically).

Preprocessing (:class:`TablePreprocessing`) is fitted on the training split's rows only:

* numeric column ``j``: missing values imputed with the training median ``m_j``, then ``(x − μ_j) / σ_j`` with the
  training mean and population std after imputation (a zero ``σ_j`` is replaced by 1);
* categorical column: one-hot over the column's levels in the file (the input layout is fixed by the file, so a
  model's size is known before splitting); a level never seen in the training rows, a level the file does not have
  and a missing value all encode as zeros (as scikit-learn's ``OneHotEncoder(handle_unknown="ignore")``).

:meth:`TablePreprocessing.record` is the fitted preprocessing as plain data, recorded with the run (and with an
exported student), and :meth:`TablePreprocessing.encode` turns raw rows (a pyarrow table, a pandas data frame or a
mapping of columns) into model inputs with it, so a student predicts from raw rows.

``synthetic`` is ``sklearn.datasets.make_classification`` from ``random_state`` (its options), optionally with
``categorical`` of its features binned into string levels and a ``missing`` fraction of numeric cells emptied, read
through the same table path: for tests and scale checks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from hpmkd.data.base import DATASETS, RawData
from hpmkd.data.storage import arrow_input, data_path
from hpmkd.registry import ConfigError, did_you_mean

#: file suffix -> reader
FORMATS = ("csv", "parquet")
MAX_SHOWN = 3  # bad values named in an error


@dataclass(frozen=True)
class Column:
    """A model-input column: ``numeric``, or ``categorical`` with the file's ``levels`` (sorted)."""

    name: str
    kind: Literal["numeric", "categorical"]
    levels: tuple[str, ...] = ()

    @property
    def width(self) -> int:
        return len(self.levels) if self.kind == "categorical" else 1


def read_file(path: str, key: str = "data.options.path") -> Any:
    """A CSV (``.csv``, ``.csv.gz``) or Parquet (``.parquet``, ``.pq``) file as a pyarrow table; empty fields and
    the usual null markers (``NA``, ``NaN``, ``null``) are missing values. ``path`` may be a file-system URI
    (:mod:`hpmkd.data.storage`)."""
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    file = data_path(path, key)
    if not file.is_file():
        raise ConfigError(f"{key}: file {str(file)!r} does not exist.")
    name = file.name.lower()
    if name.endswith((".parquet", ".pq")):
        return pq.read_table(arrow_input(file, stream=False))
    if name.endswith((".csv", ".csv.gz")):
        return pcsv.read_csv(arrow_input(file, stream=True),
                             convert_options=pcsv.ConvertOptions(strings_can_be_null=True))
    raise ConfigError(f"{key}: {file.name!r} is neither a CSV (.csv) nor a Parquet (.parquet, .pq) file.")


def as_table(rows: Any) -> Any:
    """A pyarrow table from a pyarrow table, a pandas data frame or a mapping of column name -> values."""
    import pyarrow as pa

    if isinstance(rows, pa.Table):
        return rows
    if hasattr(rows, "columns") and hasattr(rows, "dtypes"):  # a pandas data frame
        return pa.Table.from_pandas(rows, preserve_index=False)
    return pa.table(rows)


def as_strings(values: Any) -> Any:
    import pyarrow as pa
    import pyarrow.compute as pc

    return values if pa.types.is_string(values.type) else pc.cast(values, pa.string())


def numeric_values(values: Any, name: str, where: str) -> np.ndarray:
    """float64 values of a numeric column (NaN where missing); non-numbers are an error naming them."""
    import pyarrow as pa
    import pyarrow.compute as pc

    try:
        return np.asarray(pc.cast(values, pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    bad = [(row, value) for row, value in enumerate(values.to_pylist()) if value is not None and not is_number(value)]
    shown = ", ".join(f"{value!r} (row {row})" for row, value in bad[:MAX_SHOWN])
    raise ConfigError(f"{where}: column {name!r} is numeric (it is not in data.options.categorical) but has "
                      f"{len(bad)} non-numeric value(s): {shown}{' ...' if len(bad) > MAX_SHOWN else ''}. List it in "
                      f"data.options.categorical if it holds categories, data.options.drop to leave it out, or fix "
                      f"those values in the file (empty fields are read as missing).")


def is_number(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def column_codes(table: Any, column: Column, where: str) -> np.ndarray:
    """A column as float64: numeric values, or the index of each value in ``column.levels``; NaN where missing
    (and, for categories, where the value is not one of the levels)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if column.name not in table.column_names:
        hint = did_you_mean(column.name, table.column_names)
        raise ConfigError(f"{where}: the rows have no column {column.name!r}.{hint}")
    values = table.column(column.name)
    if column.kind == "numeric":
        return numeric_values(values, column.name, where)
    index = pc.index_in(as_strings(values), value_set=pa.array(column.levels, pa.string()))
    return np.asarray(pc.cast(index, pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64)


def raw_codes(table: Any, columns: list[Column], where: str) -> np.ndarray:
    """``[N, F]`` float64: each column's :func:`column_codes`."""
    if not columns:
        return np.zeros((table.num_rows, 0))
    return np.stack([column_codes(table, c, where) for c in columns], axis=1)


class TablePreprocessing:
    """Imputation, standardisation and one-hot categories fitted on training rows (module docstring).

    ``fill`` / ``mean`` / ``std``: per numeric column; ``seen``: per categorical column, which of its levels occur
    in the training rows."""

    def __init__(self, target: str, classes: list[str], columns: list[Column], fill: dict[str, float],
                 mean: dict[str, float], std: dict[str, float], seen: dict[str, list[str]]):
        self.target, self.classes, self.columns = target, list(classes), list(columns)
        self.fill, self.mean, self.std, self.seen = fill, mean, std, seen

    @classmethod
    def fit(cls, target: str, classes: list[str], columns: list[Column], rows: np.ndarray) -> "TablePreprocessing":
        """Fitted on the raw training ``rows`` (:func:`raw_codes`)."""
        fill, mean, std, seen = {}, {}, {}, {}
        for j, c in enumerate(columns):
            values = rows[:, j]
            present = values[~np.isnan(values)]
            if c.kind == "categorical":
                codes = np.unique(present.astype(np.int64))
                seen[c.name] = [c.levels[k] for k in codes]
                continue
            fill[c.name] = float(np.median(present)) if len(present) else 0.0
            imputed = np.where(np.isnan(values), fill[c.name], values)
            mean[c.name] = float(imputed.mean()) if len(imputed) else 0.0
            spread = float(imputed.std()) if len(imputed) else 0.0
            std[c.name] = spread if spread > 0 else 1.0
        return cls(target, classes, columns, fill, mean, std, seen)

    @property
    def width(self) -> int:
        return sum(c.width for c in self.columns)

    def transform(self, rows: np.ndarray) -> np.ndarray:
        """float32 ``[N, width]`` model inputs of raw code rows (:func:`raw_codes`)."""
        out = np.zeros((len(rows), self.width), dtype=np.float32)
        start = 0
        for j, c in enumerate(self.columns):
            values = rows[:, j]
            if c.kind == "numeric":
                imputed = np.where(np.isnan(values), self.fill[c.name], values)
                out[:, start] = (imputed - self.mean[c.name]) / self.std[c.name]
            else:
                position = {level: k for k, level in enumerate(c.levels)}
                seen = np.zeros(len(c.levels) + 1, dtype=bool)  # the last slot: missing, or not a level of the file
                seen[[position[v] for v in self.seen[c.name]]] = True
                codes = np.where(np.isnan(values), len(c.levels), values).astype(np.int64)
                hot = seen[codes]
                out[np.flatnonzero(hot), start + codes[hot]] = 1.0
            start += c.width
        return out

    def encode(self, rows: Any) -> np.ndarray:
        """Model inputs of raw rows (a pyarrow table, pandas data frame or mapping of columns); the target column,
        if present, and columns the model does not read are ignored."""
        return self.transform(raw_codes(as_table(rows), self.columns, "rows"))

    def params(self) -> dict[str, Any]:
        return {"preprocessing": self.record()}

    def record(self) -> dict[str, Any]:
        """The fitted preprocessing as plain data (:meth:`from_record` reads it back)."""
        columns = []
        for c in self.columns:
            if c.kind == "numeric":
                columns.append({"name": c.name, "kind": c.kind, "fill": self.fill[c.name], "mean": self.mean[c.name],
                                "std": self.std[c.name]})
            else:
                columns.append({"name": c.name, "kind": c.kind, "levels": list(c.levels), "seen": self.seen[c.name]})
        return {"format": "hpmkd.table/1", "target": self.target, "classes": self.classes, "columns": columns}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> "TablePreprocessing":
        columns = [Column(c["name"], c["kind"], tuple(c.get("levels", ()))) for c in record["columns"]]
        numeric = [c for c in record["columns"] if c["kind"] == "numeric"]
        return cls(record["target"], record["classes"], columns, {c["name"]: c["fill"] for c in numeric},
                   {c["name"]: c["mean"] for c in numeric}, {c["name"]: c["std"] for c in numeric},
                   {c["name"]: list(c["seen"]) for c in record["columns"] if c["kind"] == "categorical"})


def check_columns(names: list[str], available: list[str], key: str) -> None:
    for name in names:
        if name not in available:
            raise ConfigError(f"data.options.{key}: no column {name!r} in the table.{did_you_mean(name, available)} "
                              f"Columns: {', '.join(available)}.")


def class_labels(target: Any) -> list[str]:
    """The target's distinct values as class names, sorted (numbers numerically)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    unique = pc.unique(target.drop_null())
    if pa.types.is_integer(unique.type) or pa.types.is_floating(unique.type) or pa.types.is_boolean(unique.type):
        return as_strings(pc.take(unique, pc.sort_indices(unique))).to_pylist()
    return sorted(as_strings(unique).to_pylist())


def labels_of(table: Any, target: str, classes: list[str], key: str) -> np.ndarray:
    import pyarrow as pa
    import pyarrow.compute as pc

    values = table.column(target)
    missing = np.flatnonzero(np.asarray(values.is_null().to_numpy(zero_copy_only=False)))
    if len(missing):
        rows = ", ".join(map(str, missing[:MAX_SHOWN])) + (" ..." if len(missing) > MAX_SHOWN else "")
        raise ConfigError(f"{key}: the target column {target!r} is empty in {len(missing)} row(s) (rows {rows}); "
                          f"remove those rows from the file.")
    index = pc.index_in(as_strings(values), value_set=pa.array(classes, pa.string()))
    if index.null_count:
        unknown = sorted(set(as_strings(values).filter(index.is_null()).to_pylist()))
        raise ConfigError(f"{key}: the target column {target!r} has classes {unknown} that the training file does not "
                          f"have ({classes}).")
    return np.asarray(index.to_numpy(zero_copy_only=False), dtype=np.int64)


def table_data(table: Any, *, target: str, categorical: list[str], drop: list[str], source: str,
               test: Any = None) -> RawData:
    """:class:`RawData` of a pyarrow ``table`` (and an optional separate ``test`` table with the same columns)."""
    import pyarrow as pa

    available = table.column_names
    if target not in available:
        raise ConfigError(f"data.options.target: the table has no column {target!r}.{did_you_mean(target, available)} "
                          f"Columns: {', '.join(available)}.")
    check_columns(list(categorical), available, "categorical")
    check_columns(list(drop), available, "drop")
    if target in categorical or target in drop:
        raise ConfigError(f"data.options: the target column {target!r} cannot also be in categorical or drop.")
    if test is not None:
        absent = [c for c in available if c not in test.column_names and c not in drop]
        if absent:
            raise ConfigError(f"data.options.test_path: the test file lacks the column(s) {absent}.")
    inputs = [c for c in available if c != target and c not in drop]
    if not inputs:
        raise ConfigError("data.options.drop: no input column is left besides the target.")
    kept = inputs + [target]
    both = table if test is None else pa.concat_tables([table.select(kept), test.select(kept)])
    columns = [Column(c, "categorical", tuple(sorted(set(as_strings(both.column(c)).drop_null().to_pylist()))))
               if c in categorical else Column(c, "numeric") for c in inputs]
    classes = class_labels(table.column(target))
    if len(classes) < 2:
        raise ConfigError(f"data.options.target: column {target!r} has {len(classes)} distinct value(s); a classifier "
                          f"needs at least 2 classes.")

    def fit(rows: np.ndarray) -> TablePreprocessing:
        return TablePreprocessing.fit(target, classes, columns, rows)

    return RawData(
        train_x=raw_codes(table, columns, "data.options.path"),
        train_y=labels_of(table, target, classes, "data.options.path"),
        test_x=None if test is None else raw_codes(test, columns, "data.options.test_path"),
        test_y=None if test is None else labels_of(test, target, classes, "data.options.test_path"),
        class_names=classes,
        source=source,
        to_model=lambda rows: rows.astype(np.float32),
        preprocessing=f"table columns {[(c.name, c.kind, list(c.levels)) for c in columns]}",
        fit_preprocessing=fit,
    )


@DATASETS.register("table")
def table(path: str, target: str, categorical: list[str] = (), drop: list[str] = (),
          test_path: str | None = None) -> RawData:
    """The user's CSV or Parquet table (module docstring)."""
    test = None if test_path is None else read_file(test_path, "data.options.test_path")
    return table_data(read_file(path), target=target, categorical=list(categorical), drop=list(drop),
                      source=f"table {path}" + (f" (test: {test_path})" if test_path else ""), test=test)


#: options of ``table`` that are file paths: made absolute when the config is read (Ray workers change folder)
table.path_options = ("path", "test_path")

#: levels a synthetic categorical feature is binned into (by quantile)
SYNTHETIC_LEVELS = ("a", "b", "c", "d")


def synthetic_table(n_samples: int = 2000, n_features: int = 20, n_informative: int = 10, n_redundant: int = 2,
                    n_classes: int = 2, class_sep: float = 1.0, flip_y: float = 0.01,
                    weights: list[float] | None = None, categorical: int = 0, missing: float = 0.0,
                    random_state: int = 0) -> Any:
    """The pyarrow table of :func:`synthetic` (columns ``x0`` ... ``x{D-1}``, the last ``categorical`` ones as
    string levels, and the target ``y``)."""
    import pyarrow as pa
    from sklearn.datasets import make_classification

    if not 0 <= categorical <= n_features:
        raise ConfigError(f"data.options.categorical: between 0 and n_features ({n_features}), got {categorical}.")
    if not 0 <= missing < 1:
        raise ConfigError(f"data.options.missing: a fraction in [0, 1), got {missing}.")
    try:
        x, y = make_classification(n_samples=n_samples, n_features=n_features, n_informative=n_informative,
                                   n_redundant=n_redundant, n_classes=n_classes, class_sep=class_sep, flip_y=flip_y,
                                   weights=weights, random_state=random_state)
    except ValueError as err:
        raise ConfigError(f"data.options: make_classification rejects these options: {err}") from None
    rng = np.random.default_rng(random_state)
    columns: dict[str, Any] = {}
    for j in range(n_features):
        values = x[:, j].copy()
        if j >= n_features - categorical:
            edges = np.quantile(values, np.linspace(0, 1, len(SYNTHETIC_LEVELS) + 1)[1:-1])
            columns[f"x{j}"] = pa.array(np.asarray(SYNTHETIC_LEVELS)[np.searchsorted(edges, values)].tolist())
            continue
        values[rng.random(n_samples) < missing] = np.nan
        columns[f"x{j}"] = pa.array(values, mask=np.isnan(values))
    columns["y"] = pa.array(y.astype(np.int64))
    return pa.table(columns)


@DATASETS.register("synthetic")
def synthetic(n_samples: int = 2000, n_features: int = 20, n_informative: int = 10, n_redundant: int = 2,
              n_classes: int = 2, class_sep: float = 1.0, flip_y: float = 0.01, weights: list[float] | None = None,
              categorical: int = 0, missing: float = 0.0, random_state: int = 0) -> RawData:
    """A ``make_classification`` table from ``random_state`` (module docstring)."""
    generated = synthetic_table(n_samples, n_features, n_informative, n_redundant, n_classes, class_sep, flip_y,
                                weights, categorical, missing, random_state)
    names = [f"x{j}" for j in range(n_features - categorical, n_features)]
    return table_data(generated, target="y", categorical=names, drop=[],
                      source=f"sklearn.datasets.make_classification(random_state={random_state})")
