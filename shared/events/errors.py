"""The errors of the wire contract, and the root of every error reelstream raises.

``shared.events`` depends on nothing else of the project, so the root lives here, with
the error an invalid event raises; ``shared.exceptions`` exports both with the rest.
"""

from __future__ import annotations


class ReelstreamError(Exception):
    """Base class of reelstream's own errors."""


class InvalidEventError(ReelstreamError):
    """A message that is not a valid event of its topic. The message is the reason."""
