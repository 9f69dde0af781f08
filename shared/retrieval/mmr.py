"""Maximal Marginal Relevance re-ranking (Carbonell & Goldstein, 1998)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from shared.exceptions import ConfigurationError, NumericalError
from shared.types import Matrix


def mmr(relevance: npt.ArrayLike, vectors: Matrix, k: int, lambda_: float) -> list[int]:
    """Pick ``k`` of ``n`` candidates trading relevance against redundancy.

    Each step takes the candidate maximising
    ``lambda_ * relevance[i] - (1 - lambda_) * max_{j chosen} cos(vectors[i], vectors[j])``;
    the redundancy term is 0 while nothing is chosen, so the first pick is the most
    relevant candidate. ``lambda_ = 1`` gives the relevance order, ``lambda_ = 0`` the
    most spread-out set. Ties go to the lower index, so the result is deterministic.

    Args:
        relevance: ``(n,)`` relevance of each candidate (cosine similarity to the user).
        vectors: ``(n, d)`` candidate vectors, L2-normalised (dot product = cosine).
        k: how many to pick; capped at ``n``.
        lambda_: trade-off in ``[0, 1]``.

    Returns:
        Indices into the candidates, in the chosen order.

    Raises:
        ConfigurationError: ``lambda_`` outside ``[0, 1]`` or ``k`` negative.
        ValueError: shapes that do not fit together.
        NumericalError: NaN or infinity in the inputs.
    """
    if not 0.0 <= lambda_ <= 1.0:
        raise ConfigurationError(f"MMR lambda must be in [0, 1], got {lambda_}")
    if k < 0:
        raise ConfigurationError(f"k must be non-negative, got {k}")
    rel = np.asarray(relevance, dtype=np.float64)
    vec = np.asarray(vectors, dtype=np.float64)
    if rel.ndim != 1 or vec.ndim != 2 or vec.shape[0] != rel.shape[0]:
        raise ValueError(
            f"relevance (n,) and vectors (n, d) do not fit: {rel.shape} and {vec.shape}"
        )
    if not (np.isfinite(rel).all() and np.isfinite(vec).all()):
        raise NumericalError("NaN or infinity encountered in MMR inputs")
    n = rel.shape[0]
    k = min(k, n)
    if k == 0:
        return []

    gain = lambda_ * rel
    # Highest similarity of each candidate to the chosen set; 0 until the first pick.
    redundancy = np.zeros(n)
    available = np.ones(n, dtype=bool)
    chosen: list[int] = []
    for step in range(k):
        score = gain - (1.0 - lambda_) * redundancy if step else gain.copy()
        score[~available] = -np.inf
        best = int(np.argmax(score))  # first maximum: ties go to the lower index
        chosen.append(best)
        available[best] = False
        similarity = vec @ vec[best]
        redundancy = similarity if step == 0 else np.maximum(redundancy, similarity)
    return chosen
