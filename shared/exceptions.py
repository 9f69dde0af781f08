"""The root of every error reelstream raises on purpose."""


class ReelstreamError(Exception):
    """Base class of reelstream's own errors."""


class ConfigurationError(ReelstreamError):
    """Settings, files or checkpoints that do not fit together."""


class InvalidEventError(ReelstreamError):
    """A message that is not a valid event of its topic. The message is the reason."""


class UnprocessableEventError(ReelstreamError):
    """A valid event the service cannot act on (e.g. a rating of an unknown movie)."""


class NumericalError(ReelstreamError):
    """A NaN or infinity where a finite vector was expected."""
