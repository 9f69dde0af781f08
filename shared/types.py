"""Named types for the domain's ideas."""

from __future__ import annotations

from typing import TypeAlias

import numpy as np
import numpy.typing as npt

UserId: TypeAlias = str
MovieId: TypeAlias = str
EventId: TypeAlias = str
Vector: TypeAlias = npt.NDArray[np.float32]
"""A 1-D float32 array; item and user vectors are L2-normalised."""
Matrix: TypeAlias = npt.NDArray[np.float32]
"""A 2-D float32 array, one vector a row."""
