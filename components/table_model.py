"""A student trained on a table, exported as an MLflow model that predicts from raw rows.

:class:`TableStudent` is an MLflow ``pyfunc`` model: given raw rows (a pandas data frame with the table's columns,
as in the user's file: strings for categories, empty cells for missing values), it encodes them with the
preprocessing fitted on the training split (:class:`hpmkd.data.table.TablePreprocessing`, its record logged with
the model) and returns the student's class probabilities, one column per class. Its files are the predictor
checkpoint (``model.pt``, read with ``weights_only=True``), the model reference and the preprocessing (JSON); the
model is logged "from code" (:mod:`hpmkd.components.table_model_code`), so loading it unpickles nothing.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd

from hpmkd.components.tracking import EXPORT_LOCK, Tracker, torch_requirement
from hpmkd.data import DataSplits
from hpmkd.models.ref import DataShape, ModelRef

#: the artifacts of the exported model
WEIGHTS, MODEL, PREPROCESSING = "weights", "model", "preprocessing"
#: MLflow "models from code": the file that defines the exported model (nothing is pickled)
MODEL_CODE = Path(__file__).with_name("table_model_code.py")


class TableStudent(mlflow.pyfunc.PythonModel):
    """Raw rows -> class probabilities (module docstring)."""

    def load_context(self, context: Any) -> None:
        from hpmkd.data.table import TablePreprocessing
        from hpmkd.predictors import load_predictor

        described = json.loads(Path(context.artifacts[MODEL]).read_text())
        ref = ModelRef(described["model"], described["options"])
        shape = DataShape(described["num_classes"], tuple(described["input_shape"]))
        self.predictor = load_predictor(context.artifacts[WEIGHTS], ref, shape).eval()
        record = json.loads(Path(context.artifacts[PREPROCESSING]).read_text())
        self.preprocessing = TablePreprocessing.from_record(record)

    def predict(self, context: Any, model_input: pd.DataFrame, params: Any = None) -> pd.DataFrame:
        # a data frame: typed, yet no schema is inferred from it (MLflow 3 warns about a predict without hints)
        import torch

        x = torch.from_numpy(self.preprocessing.encode(model_input))
        with torch.no_grad():
            probs = torch.softmax(self.predictor(x), -1).numpy()
        return pd.DataFrame(probs, columns=self.preprocessing.classes)


def log_table_model(tracker: Tracker, run_id: str, model_path: str, model: ModelRef, splits: DataSplits) -> None:
    """Log the student in ``model_path`` as a :class:`TableStudent` named ``model`` on ``run_id``."""
    with tempfile.TemporaryDirectory() as folder:
        described = Path(folder) / "model.json"
        described.write_text(json.dumps({"model": model.model, "options": model.options,
                                         "num_classes": splits.num_classes, "input_shape": list(splits.input_shape)}))
        preprocessing = Path(folder) / "preprocessing.json"
        preprocessing.write_text(json.dumps(splits.preprocessing))
        with EXPORT_LOCK, mlflow.start_run(run_id=run_id, nested=True):
            mlflow.pyfunc.log_model(
                name="model", python_model=str(MODEL_CODE),
                artifacts={WEIGHTS: str(model_path), MODEL: str(described), PREPROCESSING: str(preprocessing)},
                pip_requirements=[*torch_requirement(), "pyarrow", "pandas"])
