"""The trained residual user updater: u' = normalise(u + f(u, item, rating, time gap)).

One online step ``f`` is an MLP over the current user vector ``u``, the rated item's
vector ``v``, their product, the rating (centred stars and a "liked" flag), the time
since the user's previous rating and how many ratings the user has already given. Its
output is a free direction plus a scalar pull along ``v``. A user with no rating starts
from a learned prior vector; the first rating is applied to it with a time gap of zero.

``ResidualUpdater`` runs a trained net's weights behind the ``UserUpdater`` protocol for
the user-profile service, in numpy (``shared.models.layers``); ``load_residual_updater``
loads it from a ``residual-updater`` checkpoint (``shared.models.checkpoint``). The net
as a torch module (``ResidualNet``), its training (``train_residual``) and the
checkpoint writer (``save_residual``) are the lab's, in ``infra.lab.training.residual``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path

import numpy as np

from shared.exceptions import ConfigurationError, NumericalError
from shared.models.checkpoint import check_shapes, load_checkpoint
from shared.models.layers import Linear, Mlp, normalize
from shared.models.updater import (
    DEFAULT_PRIOR_RATING,
    DEFAULT_PRIOR_STRENGTH,
    UserState,
    check_learn_rows,
    shrunk_mean_rating,
)
from shared.types import Vector

log = logging.getLogger(__name__)

KIND = "residual-updater"
"""Checkpoint kind of a ``ResidualNet``."""

VERSION_PREFIX = "residual-v1"
"""Versions read ``residual-v1-<8 hex of the weights' digest>``."""

LIKED_STARS = 4.0
"""A rating at or above this many stars sets the "liked" feature."""

FEATURE_SCALE = 4.0
"""``log1p`` of the time gap (hours) and of the rating count are divided by this so
that typical values (minutes to months, 0 to a few hundred ratings) stay within 0..2."""

NORM_EPS = 1e-12
"""Below this length a user vector cannot be normalised (a ``NumericalError``)."""


def rating_features(stars: np.ndarray) -> np.ndarray:
    """``[(r - 3) / 2, liked]`` per rating in stars: shape ``(n, 2)``."""
    centred = (stars - 3.0) / 2.0
    liked = (stars >= LIKED_STARS).astype(stars.dtype)
    return np.stack([centred, liked], axis=-1)


def n_inputs(dim: int, *, use_gap: bool, use_count: bool) -> int:
    """Width of ``f``'s input: ``[sqrt(d) u, sqrt(d) v, d (u * v), (r-3)/2, liked]``,
    then ``log1p(gap_h)/4`` and ``log1p(count)/4`` when enabled."""
    return 3 * dim + 2 + int(use_gap) + int(use_count)


# --- the online updater ------------------------------------------------------------------


class ResidualUpdater:
    """A trained residual net's weights behind the ``UserUpdater`` protocol.

    The state's ``vector`` is the user vector itself (normalised float32) and ``weight``
    is unused (0.0). The net runs in float64, so a batch (``learn_many``) and single rows
    (``learn_one``) agree to float32 rounding.

    Args:
        state: the net's weights by ``state_dict`` name (``mlp.N``, ``out``, ``prior``;
            ``log_scale``, used only in training, is not read).
        use_gap, use_count: whether ``f`` reads the time-gap and rating-count features.
        model_version: published with every profile.

    Raises:
        ConfigurationError: the weights do not describe such a net.
    """

    def __init__(
        self,
        state: Mapping[str, np.ndarray],
        *,
        use_gap: bool,
        use_count: bool,
        model_version: str,
    ) -> None:
        self.model_version = model_version
        self.use_gap = use_gap
        self.use_count = use_count
        if "prior" not in state or "out.weight" not in state or "out.bias" not in state:
            raise ConfigurationError("residual net weights need prior, out.weight and out.bias")
        self._dim = int(state["prior"].shape[0])
        self._mlp = Mlp.from_state(state, "mlp", activate_last=True, dtype=np.float64)
        self._out = Linear(state["out.weight"], state["out.bias"], np.float64)
        want = n_inputs(self._dim, use_gap=use_gap, use_count=use_count)
        if self._mlp.n_in != want or self._out.n_in != self._mlp.n_out:
            raise ConfigurationError(
                f"residual net layers take {self._mlp.n_in} inputs, {want} expected"
            )
        if self._out.n_out != self._dim + 1:
            raise ConfigurationError(
                f"residual net output has {self._out.n_out} columns, {self._dim + 1} expected"
            )
        self._prior = normalize(np.asarray(state["prior"], dtype=np.float64), NORM_EPS)

    @property
    def dim(self) -> int:
        """Dimension of the item and user vectors."""
        return self._dim

    def step(
        self,
        user: np.ndarray,
        item: np.ndarray,
        stars: np.ndarray,
        gap_hours: np.ndarray,
        count: np.ndarray,
    ) -> np.ndarray:
        """The next user vectors ``normalise(u + delta + a v)``, float64 ``(n, dim)``
        (a zero-length result stays zero: callers check).

        Args:
            user, item: ``(n, dim)`` unit user and item vectors.
            stars: ``(n,)`` ratings; ``gap_hours``: ``(n,)`` hours since the user's
                previous rating (0 for the first); ``count``: ``(n,)`` ratings before.
        """
        dim = self._dim
        root = math.sqrt(dim)
        parts = [user * root, item * root, user * item * dim, rating_features(stars)]
        if self.use_gap:
            parts.append((np.log1p(np.maximum(gap_hours, 0.0)) / FEATURE_SCALE)[:, None])
        if self.use_count:
            parts.append((np.log1p(np.maximum(count, 0.0)) / FEATURE_SCALE)[:, None])
        out = self._out(self._mlp(np.concatenate(parts, axis=-1)))
        delta, pull = out[:, :dim] / root, out[:, dim:]
        return normalize(user + delta + pull * item, NORM_EPS)

    def initial_state(self) -> UserState:
        return UserState()

    def learn_one(
        self, state: UserState, item_vector: Vector, rating: float, occurred_at: datetime
    ) -> UserState:
        """Apply one rating (see ``UserUpdater.learn_one``).

        Raises:
            NumericalError: NaN or infinity in ``rating``, ``item_vector`` or the result.
            ValueError: ``item_vector`` is not 1-D of the net's dimension, or the state's
                vector has another dimension.
        """
        return self.learn_many([state], [item_vector], [rating], [occurred_at])[0]

    def learn_many(
        self,
        states: Sequence[UserState],
        item_vectors: Sequence[Vector],
        ratings: Sequence[float],
        times: Sequence[datetime],
    ) -> list[UserState]:
        """``learn_one`` over independent rows, in one pass through the net.

        Raises:
            NumericalError, ValueError: as ``learn_one``, for any row.
        """
        n = len(states)
        items, stars = check_learn_rows(states, item_vectors, ratings, times, self.dim)
        if n == 0:
            return []
        users = np.empty((n, self.dim), dtype=np.float64)
        gaps = np.zeros(n, dtype=np.float64)
        counts = np.zeros(n, dtype=np.float64)
        prior = self._prior
        for i, state in enumerate(states):
            if state.vector is None:
                users[i] = prior
                continue
            if state.vector.shape != (self.dim,):
                raise ValueError(
                    f"item vector has dimension {self.dim}, the user state {state.vector.shape[0]}"
                )
            users[i] = state.vector
            counts[i] = state.n_ratings
            if state.last_at is not None:
                # A rating older than the last one (clock skew) counts as no gap.
                gaps[i] = max((times[i] - state.last_at).total_seconds() / 3600.0, 0.0)
        if not np.isfinite(users).all():
            raise NumericalError("NaN or infinity in a stored user vector")
        new = self.step(users, items.astype(np.float64), stars, gaps, counts)
        norms = np.linalg.norm(new, axis=1)
        if not np.isfinite(new).all():
            raise NumericalError("NaN or infinity in an updated user vector")
        if (norms < 0.5).any():
            raise NumericalError("an updated user vector has zero length")
        vectors = new.astype(np.float32)
        return [
            UserState(
                vector=vectors[i].copy(),
                weight=0.0,
                n_ratings=state.n_ratings + 1,
                rating_sum=state.rating_sum + float(ratings[i]),
                rated=state.rated,
                ratings=state.ratings,
                last_at=times[i],
                last_offset=state.last_offset,
            )
            for i, state in enumerate(states)
        ]

    def vector(self, state: UserState) -> Vector | None:
        """The user vector (the state's, re-normalised in float32); None before any rating.

        Raises:
            NumericalError: the stored vector is not finite or has (near) zero length.
        """
        if state.vector is None:
            return None
        stored = state.vector.astype(np.float64)
        norm = float(np.linalg.norm(stored))
        if not np.isfinite(norm):
            raise NumericalError("NaN or infinity in the user vector")
        if norm < NORM_EPS:
            raise NumericalError("the user vector has zero length")
        return (stored / norm).astype(np.float32)

    def centre(self) -> Vector:
        """The learned prior every new user starts from: what the profiles share."""
        return self._prior.astype(np.float32)

    def mean_rating(
        self,
        state: UserState,
        prior: float = DEFAULT_PRIOR_RATING,
        strength: float = DEFAULT_PRIOR_STRENGTH,
    ) -> float:
        """The shrunk mean rating in stars (see ``shrunk_mean_rating``)."""
        return shrunk_mean_rating(state, prior, strength)


# --- checkpoints ----------------------------------------------------------------------------


def load_residual_updater(directory: Path, expected_dim: int | None = None) -> ResidualUpdater:
    """The ``ResidualUpdater`` of a ``residual-updater`` checkpoint.

    Args:
        directory: the checkpoint folder.
        expected_dim: the deployed item encoder's dimension; None skips the check.

    Raises:
        ConfigurationError: no such checkpoint, another kind, a config that does not
            describe a net, weights that do not fit it, or another item dimension.
    """
    state, config = load_checkpoint(directory, KIND)
    try:
        dim = int(config["dim"])
        hidden, layers = int(config["hidden"]), int(config["layers"])
        use_gap, use_count = bool(config["use_gap"]), bool(config["use_count"])
        version = str(config["version"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigurationError(
            f"checkpoint {directory} config does not describe a net: {exc}"
        ) from exc
    if expected_dim is not None and dim != expected_dim:
        raise ConfigurationError(
            f"checkpoint {directory} was trained on {dim}-d item vectors; "
            f"the item encoder gives {expected_dim}-d"
        )
    state.pop("log_scale", None)
    check_shapes(
        state,
        state_shapes(dim, hidden, layers, use_gap=use_gap, use_count=use_count),
        Path(directory),
    )
    updater = ResidualUpdater(state, use_gap=use_gap, use_count=use_count, model_version=version)
    log.info(
        "residual updater loaded version=%s dim=%d dir=%s", updater.model_version, dim, directory
    )
    return updater


def state_shapes(
    dim: int, hidden: int, layers: int, *, use_gap: bool, use_count: bool
) -> dict[str, tuple[int, ...]]:
    """The ``state_dict`` of a net of this config, name by name (``nn.Sequential``
    numbering: a ``Linear`` then a ``GELU`` per hidden layer), less ``log_scale``, which
    only training uses."""
    shapes: dict[str, tuple[int, ...]] = {}
    width = n_inputs(dim, use_gap=use_gap, use_count=use_count)
    for k in range(layers):
        shapes[f"mlp.{2 * k}.weight"] = (hidden, width)
        shapes[f"mlp.{2 * k}.bias"] = (hidden,)
        width = hidden
    shapes["out.weight"] = (dim + 1, hidden)
    shapes["out.bias"] = (dim + 1,)
    shapes["prior"] = (dim,)
    return shapes
