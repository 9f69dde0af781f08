"""The trained residual user updater: u' = normalise(u + f(u, item, rating, time gap)).

``ResidualNet`` is one online step. Its ``f`` is an MLP over the current user vector
``u``, the rated item's vector ``v``, their product, the rating (centred stars and a
"liked" flag), the time since the user's previous rating and how many ratings the user
has already given. Its output is a free direction plus a scalar pull along ``v``; the
output layer starts at zero, so an untrained net is exactly the identity (``u' = u``)
and training starts from a stable point. A user with no rating starts from a learned
prior vector; the first rating is applied to it with a time gap of zero.

``ResidualUpdater`` wraps a trained net behind the ``UserUpdater`` protocol for the
user-profile service; ``load_residual_updater`` loads it from a ``residual-updater``
checkpoint (``shared.models.checkpoint``). Training (``train_residual``,
``ResidualConfig``: a next-item objective unrolled on the net's own outputs, as it runs
online) and the checkpoint writer (``save_residual``) are the lab's, in
``infra.lab.training.residual``.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 (the usual torch alias)
from torch import nn

from shared.exceptions import ConfigurationError, NumericalError
from shared.models.checkpoint import load_checkpoint, load_into, state_digest
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

_EPS = 1e-12
"""Below this length a user vector cannot be normalised (a ``NumericalError``)."""


def rating_features(ratings: torch.Tensor) -> torch.Tensor:
    """``[(r - 3) / 2, liked]`` per rating in stars: shape ``(n, 2)``."""
    centred = (ratings - 3.0) / 2.0
    liked = (ratings >= LIKED_STARS).to(ratings.dtype)
    return torch.stack([centred, liked], dim=-1)


class ResidualNet(nn.Module):
    """One online update ``u' = normalise(u + f(u, v, rating, gap, count))``.

    ``f``'s input is ``[sqrt(d) u, sqrt(d) v, d (u * v), (r-3)/2, liked,
    log1p(gap_h)/4, log1p(count)/4]`` (the gap and count only when enabled; the scaling
    makes unit vectors' entries order one). Its output layer gives a direction ``delta``
    (divided by ``sqrt(d)``) and a scalar ``a``: ``f = delta + a * v``, so a rating can
    pull the user towards (or push away from) the item directly and bend the vector
    elsewhere. That layer starts at zero: an untrained net is the identity.

    Args:
        dim: item (and user) vector dimension.
        hidden: hidden width (default 256).
        layers: hidden layers (default 2).
        use_gap: feed the time gap feature (default True).
        use_count: feed the rating-count feature (default True).
        init_scale: starting softmax scale used in training (default 10).
    """

    def __init__(
        self,
        dim: int,
        hidden: int = 256,
        layers: int = 2,
        *,
        use_gap: bool = True,
        use_count: bool = True,
        init_scale: float = 10.0,
    ) -> None:
        super().__init__()
        if dim < 1 or hidden < 1 or layers < 1:
            raise ValueError(f"dim, hidden and layers must be >= 1, got {dim}, {hidden}, {layers}")
        self.dim = dim
        self.use_gap = use_gap
        self.use_count = use_count
        n_in = 3 * dim + 2 + int(use_gap) + int(use_count)
        blocks: list[nn.Module] = []
        width = n_in
        for _ in range(layers):
            blocks += [nn.Linear(width, hidden), nn.GELU()]
            width = hidden
        self.mlp = nn.Sequential(*blocks)
        self.out = nn.Linear(hidden, dim + 1)
        """f's output layer: ``delta`` (dim) and the pull ``a`` along the item (1)."""
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.prior = nn.Parameter(torch.randn(dim) / math.sqrt(dim))
        """Cold users' vector before normalisation."""
        self.log_scale = nn.Parameter(torch.tensor(math.log(init_scale)))
        """Training only: logits = exp(log_scale) * cosine."""

    def prior_vector(self) -> torch.Tensor:
        """The normalised prior, shape ``(dim,)``."""
        return F.normalize(self.prior, dim=0, eps=_EPS)

    def scale(self) -> torch.Tensor:
        """The softmax scale, clamped to [1, 100] so the loss cannot blow up."""
        return self.log_scale.exp().clamp(1.0, 100.0)

    def forward(
        self,
        user: torch.Tensor,
        item: torch.Tensor,
        rating: torch.Tensor,
        gap_hours: torch.Tensor,
        count: torch.Tensor,
    ) -> torch.Tensor:
        """The next user vectors.

        Args:
            user: ``(n, dim)`` unit user vectors.
            item: ``(n, dim)`` unit item vectors.
            rating: ``(n,)`` stars.
            gap_hours: ``(n,)`` hours since the user's previous rating (0 for the first).
            count: ``(n,)`` ratings the user gave before this one.

        Returns:
            ``(n, dim)``, L2-normalised (a zero-length result stays zero: callers check).
        """
        root = math.sqrt(self.dim)
        parts = [user * root, item * root, user * item * self.dim, rating_features(rating)]
        if self.use_gap:
            parts.append((torch.log1p(gap_hours.clamp_min(0.0)) / FEATURE_SCALE)[:, None])
        if self.use_count:
            parts.append((torch.log1p(count.clamp_min(0.0)) / FEATURE_SCALE)[:, None])
        out = self.out(self.mlp(torch.cat(parts, dim=-1)))
        delta, pull = out[:, : self.dim] / root, out[:, self.dim :]
        return F.normalize(user + delta + pull * item, dim=-1, eps=_EPS)

    def describe(self) -> dict[str, Any]:
        """What rebuilds this module (goes into the checkpoint config)."""
        first = self.mlp[0]
        assert isinstance(first, nn.Linear)
        return {
            "dim": self.dim,
            "hidden": first.out_features,
            "layers": sum(isinstance(m, nn.Linear) for m in self.mlp),
            "use_gap": self.use_gap,
            "use_count": self.use_count,
            "features": [
                "sqrt(d)*u",
                "sqrt(d)*v",
                "d*u*v",
                "(r-3)/2",
                f"r>={LIKED_STARS:g}",
                *(["log1p(gap_hours)/4"] if self.use_gap else []),
                *(["log1p(count)/4"] if self.use_count else []),
            ],
        }


def weights_version(net: ResidualNet) -> str:
    """``residual-v1-<8 hex>``: a digest of the weights, so two trainings differ."""
    return f"{VERSION_PREFIX}-{state_digest(net)[:8]}"


# --- the online updater ------------------------------------------------------------------


class ResidualUpdater:
    """A trained ``ResidualNet`` behind the ``UserUpdater`` protocol.

    The state's ``vector`` is the user vector itself (normalised float32) and ``weight``
    is unused (0.0). The net runs in float64 on CPU under ``torch.no_grad``, so a batch
    (``learn_many``) and single rows (``learn_one``) agree to float32 rounding.

    Args:
        net: the trained net (copied; the caller's module is not changed).
        model_version: published with every profile (default: the weights' digest).
    """

    def __init__(self, net: ResidualNet, model_version: str | None = None) -> None:
        self.model_version = model_version or weights_version(net)
        self._net = copy.deepcopy(net).to(device="cpu", dtype=torch.float64).eval()
        with torch.no_grad():
            self._prior = self._net.prior_vector().clone()

    @property
    def dim(self) -> int:
        """Dimension of the item and user vectors."""
        return self._net.dim

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
        prior = self._prior.numpy()
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
        with torch.no_grad():
            new = self._net(
                torch.from_numpy(users),
                torch.from_numpy(items.astype(np.float64)),
                torch.from_numpy(stars),
                torch.from_numpy(gaps),
                torch.from_numpy(counts),
            ).numpy()
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
        if norm < _EPS:
            raise NumericalError("the user vector has zero length")
        return (stored / norm).astype(np.float32)

    def centre(self) -> Vector:
        """The learned prior every new user starts from: what the profiles share."""
        return self._prior.numpy().astype(np.float32)

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
        net = ResidualNet(
            dim,
            int(config["hidden"]),
            int(config["layers"]),
            use_gap=bool(config["use_gap"]),
            use_count=bool(config["use_count"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigurationError(
            f"checkpoint {directory} config does not describe a net: {exc}"
        ) from exc
    if expected_dim is not None and dim != expected_dim:
        raise ConfigurationError(
            f"checkpoint {directory} was trained on {dim}-d item vectors; "
            f"the item encoder gives {expected_dim}-d"
        )
    load_into(net, state, Path(directory))
    updater = ResidualUpdater(net, str(config["version"]))
    log.info(
        "residual updater loaded version=%s dim=%d dir=%s", updater.model_version, dim, directory
    )
    return updater
