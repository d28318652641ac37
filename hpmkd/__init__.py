"""hpmkd: multi-teacher, multi-stage knowledge distillation (the library: plain PyTorch, no Ray or MLflow)."""

from hpmkd.version import __version__

__all__ = ["__version__"]
