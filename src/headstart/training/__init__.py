"""Training: head training on cached features, and the recipes built on it."""

from ..config import TrainConfig
from .head import class_weights, fit_head

__all__ = ["TrainConfig", "class_weights", "fit_head"]
