"""MLflow "models from code" entry of an exported table student (:mod:`hpmkd.components.table_model`): MLflow
runs this file when the model is loaded."""

from mlflow.models import set_model

from hpmkd.components.table_model import TableStudent

set_model(TableStudent())
