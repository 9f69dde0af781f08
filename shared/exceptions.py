"""The root of every error reelstream raises on purpose, and its kinds.

``ReelstreamError`` and ``InvalidEventError`` are the wire contract's
(``shared.events.errors``), exported here with the others.
"""

from shared.events.errors import InvalidEventError, ReelstreamError

__all__ = [
    "ConfigurationError",
    "InvalidEventError",
    "NumericalError",
    "ReelstreamError",
    "UnprocessableEventError",
]


class ConfigurationError(ReelstreamError):
    """Settings, files or checkpoints that do not fit together."""


class UnprocessableEventError(ReelstreamError):
    """A valid event the service cannot act on (e.g. a rating of an unknown movie)."""


class NumericalError(ReelstreamError):
    """A NaN or infinity where a finite vector was expected."""
