"""Online collaborative filtering: BPR factors learned one rating at a time (a baseline).

``OnlineBPR`` is matrix factorisation trained as a stream (Rendle et al. 2009, "BPR:
Bayesian personalized ranking from implicit feedback", run online as in Vinagre et al.
2014): user factors ``P``, item factors ``Q`` and item biases ``b``; for each rating
(u, i), of any value, ``n_negatives`` movies ``j`` that u has not rated are drawn
uniformly from the movies rated so far by anyone (the movies in circulation), and one
SGD step ascends ``sum_j ln sigmoid(x_ui - x_uj)`` with L2, ``x_ui = p_u . q_i + b_i``.

``standardised_scores`` gives a user's scores of movies standardised over every movie
the model knows, so the value means the same early in a stream, when factors are
small, as later. ``bpr_step`` and ``sample_negatives`` are the ranking half of the
``online-mf`` baseline. The factors are one global state updated in rating order, so
the services do not use it: the ranker's collaborative feature is ``co_score``, from
per-movie co-rating counts (``shared.models.item_stats``).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence

import numpy as np
import numpy.typing as npt

from shared.exceptions import NumericalError
from shared.types import MovieId, UserId

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.intp]


def sample_negatives(
    rng: np.random.Generator, pool: IntArray, rated: Collection[int], item: int, n: int
) -> IntArray:
    """Up to ``n`` distinct rows drawn uniformly from ``pool`` that are neither ``item``
    nor in ``rated`` (a few spares are drawn, so rejections rarely leave too few)."""
    if len(pool) == 0:
        return np.zeros(0, dtype=np.intp)
    drawn = pool[rng.integers(0, len(pool), 2 * n + 2)]
    negatives: list[int] = []
    for row in drawn.tolist():
        if row != item and row not in rated and row not in negatives:
            negatives.append(row)
            if len(negatives) == n:
                break
    return np.asarray(negatives, dtype=np.intp)


def bpr_step(
    p: FloatArray,
    q: FloatArray,
    b: FloatArray,
    user: int,
    item: int,
    negatives: IntArray,
    lr: float,
    l2: float,
) -> bool:
    """One BPR SGD step in place on rows of ``p`` (users), ``q`` and ``b`` (items), all
    gradients taken at the values before the step. False when a score is not finite
    (nothing is updated then)."""
    if len(negatives) == 0:
        return True
    p_u = p[user].copy()
    q_i = q[item].copy()
    q_j = q[negatives]
    differences = q_i - q_j  # (n, dim)
    x = differences @ p_u + (b[item] - b[negatives])
    if not np.isfinite(x).all():
        return False
    # sigmoid(-x), the weight of each triple in the gradient of ln sigmoid(x), via tanh
    # because exp overflows for large |x|.
    weight = 0.5 - 0.5 * np.tanh(0.5 * x)
    total = float(weight.sum())
    p[user] += lr * (weight @ differences - l2 * p_u)
    q[item] += lr * (total * p_u - l2 * q_i)
    q[negatives] = q_j + lr * (-weight[:, None] * p_u - l2 * q_j)
    b[item] += lr * (total - l2 * b[item])
    b[negatives] += lr * (-weight - l2 * b[negatives])
    return True


def grow_rows(array: FloatArray, n_rows: int) -> FloatArray:
    """``array`` with at least ``n_rows`` rows; grows by doubling (new rows are zero)."""
    if n_rows <= array.shape[0]:
        return array
    capacity = max(n_rows, 2 * array.shape[0], 64)
    grown = np.zeros((capacity, *array.shape[1:]), dtype=array.dtype)
    grown[: array.shape[0]] = array
    return grown


class OnlineBPR:
    """Streaming BPR factors of users and movies (see the module docstring).

    Args:
        dim: factors per user and movie (default 32).
        lr: learning rate (default 0.1).
        l2: L2 weight per update (default 0.01).
        n_negatives: negatives drawn per rating (default 4).
        init_std: standard deviation of a new user's or movie's factors (default 0.1).
        seed: seeds the initial factors and the negative draws (default 0).

    The defaults are the ``online-mf`` baseline's, chosen there on a validation split
    of TRAIN.
    """

    def __init__(
        self,
        dim: int = 32,
        lr: float = 0.1,
        l2: float = 0.01,
        n_negatives: int = 4,
        init_std: float = 0.1,
        seed: int = 0,
    ) -> None:
        if dim < 1 or n_negatives < 1:
            raise ValueError("dim and n_negatives must be >= 1")
        for name, value in (("lr", lr), ("l2", l2), ("init_std", init_std)):
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be finite and >= 0, got {value!r}")
        self.dim = dim
        self.lr = lr
        self.l2 = l2
        self.n_negatives = n_negatives
        self.init_std = init_std
        self.seed = seed
        self._rng = np.random.default_rng(seed)
        self._items: dict[MovieId, int] = {}
        self._users: dict[UserId, int] = {}
        self._rated: list[set[int]] = []
        self._p: FloatArray = np.zeros((0, dim))
        self._q: FloatArray = np.zeros((0, dim))
        self._b: FloatArray = np.zeros(0)

    def params(self) -> dict[str, float]:
        """The constructor arguments: ``OnlineBPR(**model.params())`` starts an equal,
        empty one (stored in ranker checkpoints so services learn the same feature)."""
        return {
            "dim": self.dim,
            "lr": self.lr,
            "l2": self.l2,
            "n_negatives": self.n_negatives,
            "init_std": self.init_std,
            "seed": self.seed,
        }

    @classmethod
    def from_params(cls, params: dict[str, float]) -> OnlineBPR:
        """An empty model with these ``params()`` (numbers may come back as floats from
        JSON).

        Raises:
            KeyError: a parameter is missing.
            ValueError: a parameter is out of range.
        """
        return cls(
            dim=int(params["dim"]),
            lr=float(params["lr"]),
            l2=float(params["l2"]),
            n_negatives=int(params["n_negatives"]),
            init_std=float(params["init_std"]),
            seed=int(params["seed"]),
        )

    @property
    def n_items(self) -> int:
        """Movies rated at least once so far."""
        return len(self._items)

    def _item_row(self, movie_id: MovieId) -> int:
        row = self._items.get(movie_id)
        if row is None:
            row = self._items[movie_id] = len(self._items)
            self._q = grow_rows(self._q, row + 1)
            self._b = grow_rows(self._b, row + 1)
            self._q[row] = self._rng.normal(0.0, self.init_std, self.dim)
        return row

    def _user_row(self, user_id: UserId) -> int:
        row = self._users.get(user_id)
        if row is None:
            row = self._users[user_id] = len(self._users)
            self._p = grow_rows(self._p, row + 1)
            self._p[row] = self._rng.normal(0.0, self.init_std, self.dim)
            self._rated.append(set())
        return row

    def learn_one(self, user_id: UserId, movie_id: MovieId) -> None:
        """One BPR step on the user's rating of the movie (its value does not matter).

        Raises:
            NumericalError: the factors went NaN or infinite.
        """
        user = self._user_row(user_id)
        item = self._item_row(movie_id)
        self._rated[user].add(item)
        pool = np.arange(len(self._items), dtype=np.intp)
        negatives = sample_negatives(self._rng, pool, self._rated[user], item, self.n_negatives)
        if not bpr_step(self._p, self._q, self._b, user, item, negatives, self.lr, self.l2):
            raise NumericalError(f"NaN in online BPR factors user_id={user_id} movie_id={movie_id}")

    def learn_many(self, user_ids: Sequence[UserId], movie_ids: Sequence[MovieId]) -> None:
        """``learn_one`` for each pair, in order."""
        if len(user_ids) != len(movie_ids):
            raise ValueError(f"{len(user_ids)} users but {len(movie_ids)} movies")
        for user_id, movie_id in zip(user_ids, movie_ids, strict=True):
            self.learn_one(user_id, movie_id)

    def standardised_scores(self, user_id: UserId, movie_ids: Sequence[MovieId]) -> FloatArray:
        """``(len(movie_ids),)``: the user's scores ``p_u . q_j + b_j`` of the movies,
        as z-scores against the user's scores of every movie the model knows. Zeros for
        a user without ratings, or before two movies are known; a movie never rated
        scores as the mean (0)."""
        out = np.zeros(len(movie_ids))
        user = self._users.get(user_id)
        n = len(self._items)
        if user is None or n < 2:
            return out
        scores = self._q[:n] @ self._p[user] + self._b[:n]
        spread = float(scores.std())
        if not spread > 0:
            return out
        standard = (scores - float(scores.mean())) / spread
        rows = np.fromiter(
            (self._items.get(m, -1) for m in movie_ids), dtype=np.intp, count=len(movie_ids)
        )
        known = rows >= 0
        out[known] = standard[rows[known]]
        return out
