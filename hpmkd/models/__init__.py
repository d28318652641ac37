"""The model zoo: :func:`create_model` builds any registered, torchvision or timm model by name.

Families (one module each): :mod:`~hpmkd.models.cnn` (``cnn``, ``cnn_tiny`` .. ``cnn_large``),
:mod:`~hpmkd.models.mlp` (``mlp``), :mod:`~hpmkd.models.linear` (``logistic_regression``),
:mod:`~hpmkd.models.tabular` (``tabular_resnet``), :mod:`~hpmkd.models.meta_mlp` (``meta_mlp``, a head stacked on frozen
teachers), :mod:`~hpmkd.models.cifar_resnet` (``resnet8`` .. ``resnet110``, ``resnet8x4``,
``resnet32x4``), :mod:`~hpmkd.models.wrn` (``wrn_16_1`` .. ``wrn_40_2``), :mod:`~hpmkd.models.vgg` (``vgg8``,
``vgg13``), :mod:`~hpmkd.models.tv` (every torchvision classification model) and :mod:`~hpmkd.models.timm_models`
(every timm model). Every model carries ``model.taps``.
"""

from hpmkd.models import (cifar_resnet, cnn, linear, meta_mlp, mlp, tabular, vgg,  # noqa: F401  (the families)
                          wrn)
from hpmkd.models.base import MODELS, count_params, model_taps
from hpmkd.models.factory import create_model, is_model, list_models
from hpmkd.models.state import load_state_checked

__all__ = ["MODELS", "count_params", "create_model", "is_model", "list_models", "load_state_checked", "model_taps"]
