"""Typed errors of the audit package.

Every failure a user can cause (a bad file, a wrong name, an image that cannot be read) raises a
subclass of `AuditError` whose message is written for that user: the dashboard shows it as is, the
command line prints it, and tests assert the type.
"""


class AuditError(Exception):
    """Base of every error the audit package raises on bad input."""


class UnknownSourceError(AuditError):
    """A model source string names no known model."""


class ModelFileError(AuditError):
    """A model file is missing, corrupt, truncated or not a Keras model at all."""


class UnsafeModelError(ModelFileError):
    """A model file asks for code to run on load (Lambda layers, foreign modules, ...) and is refused."""


class WeightsUnavailableError(AuditError):
    """Pretrained weights are neither in the local cache nor downloadable."""


class NotAnImageModelError(AuditError):
    """The model does not take images (N, H, W, C) as its single input."""


class UnknownLayerError(AuditError, KeyError):
    """A layer name is not in the model."""

    def __str__(self):  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class ImageError(AuditError):
    """An image cannot be decoded, is too large, or has an unusable shape."""


class StorageError(AuditError):
    """The data folder cannot be written (full, read-only): the result stays on screen, uncached."""


class ServerBusyError(AuditError):
    """The server's memory budget is held by other sessions' work for longer than a quick view may wait."""


class QuantizationError(AuditError):
    """The model cannot be converted to integers, or a layer asked to stay in float is not in it."""
