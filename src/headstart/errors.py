"""headstart's exception types: each says what was received, what was expected, and what to do."""

from __future__ import annotations

__all__ = [
    "HeadstartError",
    "UnknownBackboneError",
    "WeightsUnavailableError",
    "WeightsMismatchError",
    "DatasetError",
    "ImageReadError",
    "RunFormatError",
    "NotFittedError",
    "ConfigError",
    "StorageError",
    "EngineError",
    "TrainingError",
]


class HeadstartError(Exception):
    """Base of every error headstart raises on purpose; the CLI prints it as one line."""


class ConfigError(HeadstartError, ValueError):
    """A setting has a value headstart cannot use."""


class UnknownBackboneError(HeadstartError, KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class WeightsUnavailableError(HeadstartError):
    """Pretrained weights were asked for but no source could provide them."""


class WeightsMismatchError(HeadstartError):
    """A weights file does not fit the backbone it was given to."""


class DatasetError(HeadstartError):
    """The data cannot be used for training or evaluation as laid out."""


class ImageReadError(HeadstartError):
    """One image file could not be read; callers skip and report it."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class RunFormatError(HeadstartError):
    """A run folder or model file is missing, damaged or from an incompatible version."""


class NotFittedError(HeadstartError, AttributeError):
    """A classifier was used before it was trained or loaded."""


class StorageError(HeadstartError):
    """An output or cache folder cannot be written, or its disk has no room for what the run will write."""


class EngineError(HeadstartError):
    """An inference engine cannot run this backbone (not installed, or the export failed)."""


class TrainingError(HeadstartError):
    """Training cannot go on: the loss stopped being a finite number."""
