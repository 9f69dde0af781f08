"""Baseline recommenders for protocol T1: what reelstream has to beat.

Three models implement :class:`~infra.lab.evaluation.model.EvalModel`:

- :class:`MostPopular` (``"most-popular"``): static; TRAIN rating counts, and Koren's
  baseline predictor (global mean + shrunk item and user biases) for the stars.
- :class:`OnlinePopularity` (``"online-popularity"``): streaming; exponentially decayed
  rating counts with a half-life in events, and the same bias predictor updated online.
- :class:`OnlineMF` (``"online-mf"``): streaming matrix factorisation learned per event;
  online BPR with sampled negatives for the ranking, biased MF regression by SGD for the
  stars.

Movies are identified by the order in which they were first added ("position"): ties in
every ranking go to the lower position. Adding a movie again keeps its position (these
models read nothing from a movie but its id). Ratings of movies that were never added
are learned from, but such a movie is recommended only once it is added.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from collections.abc import Set as AbstractSet

import numpy as np
import numpy.typing as npt

from infra.lab.evaluation.metrics import top_k
from infra.lab.evaluation.model import DEFAULT_RATING
from infra.lab.evaluation.online_cf import bpr_step, grow_rows, sample_negatives
from shared.events import MoviePublished, RatingSubmitted
from shared.exceptions import NumericalError
from shared.types import MovieId, UserId

MIN_RATING = 0.5
"""Lowest star rating; predictions are clipped to [``MIN_RATING``, ``MAX_RATING``]."""
MAX_RATING = 5.0
"""Highest star rating."""

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.intp]


def _clip_rating(value: float) -> float:
    return min(MAX_RATING, max(MIN_RATING, value))


class _ItemIndex:
    """A row for every movie seen (added or rated) and the added ones in add order."""

    def __init__(self) -> None:
        self.rows: dict[MovieId, int] = {}
        self.added_ids: list[MovieId] = []
        self._added: set[MovieId] = set()
        self._added_rows: list[int] = []
        self._added_array: IntArray | None = np.zeros(0, dtype=np.intp)

    def __len__(self) -> int:
        return len(self.rows)

    def row(self, movie_id: MovieId) -> int:
        """The movie's row, creating it (unadded) when the movie is new."""
        row = self.rows.get(movie_id)
        if row is None:
            row = self.rows[movie_id] = len(self.rows)
        return row

    def add(self, movie_id: MovieId) -> int:
        """Make the movie recommendable (a second add keeps its position); its row."""
        row = self.row(movie_id)
        if movie_id not in self._added:
            self._added.add(movie_id)
            self.added_ids.append(movie_id)
            self._added_rows.append(row)
            self._added_array = None
        return row

    @property
    def added_rows(self) -> IntArray:
        """Rows of the added movies, in add order (aligned with ``added_ids``)."""
        if self._added_array is None:
            self._added_array = np.asarray(self._added_rows, dtype=np.intp)
        return self._added_array


class BiasPredictor:
    """Koren's baseline predictor: ``r̂(u, i) = μ + b_u + b_i``, clipped to [0.5, 5] stars.

    ``b_i = Σ_u (r_ui - μ) / (item_shrinkage + n_i)`` and
    ``b_u = Σ_i (r_ui - μ - b_i) / (user_shrinkage + n_u)`` (Koren 2010, "Factor in the
    neighbors", eq. 2-3): the shrinkages are pseudo-counts of ratings pulling a bias
    towards 0. A user or movie without ratings has bias 0; with no ratings at all the
    prediction is ``DEFAULT_RATING``.

    ``fit`` computes these exactly from a batch. ``learn_one`` keeps running sums per user
    and movie: ``μ`` and ``b_i`` are always exact for everything learned so far, while the
    ``b_i`` inside a user's residual sum is the one current when the rating arrived
    (O(1) per event instead of revisiting the user's history).

    Args:
        item_shrinkage: pseudo-count of ``b_i`` in ratings (default 10, must be >= 0).
        user_shrinkage: pseudo-count of ``b_u`` in ratings (default 5, must be >= 0).
    """

    def __init__(self, item_shrinkage: float = 10.0, user_shrinkage: float = 5.0) -> None:
        if item_shrinkage < 0 or user_shrinkage < 0:
            raise ValueError("shrinkages must be >= 0")
        self.item_shrinkage = item_shrinkage
        self.user_shrinkage = user_shrinkage
        self._reset()

    def _reset(self) -> None:
        self._total = 0.0
        self._count = 0
        self._item_sum: dict[MovieId, float] = {}
        self._item_count: dict[MovieId, int] = {}
        # Σ (r - b_i) over the user's ratings; b_u = (that - n_u·μ) / (λ_u + n_u).
        self._user_sum: dict[UserId, float] = {}
        self._user_count: dict[UserId, int] = {}

    @property
    def mean(self) -> float:
        """Global mean μ in stars (``DEFAULT_RATING`` before any rating)."""
        return self._total / self._count if self._count else DEFAULT_RATING

    def item_bias(self, movie_id: MovieId) -> float:
        """``b_i`` in stars (0 for a movie without ratings)."""
        n = self._item_count.get(movie_id, 0)
        if n == 0:
            return 0.0
        return (self._item_sum[movie_id] - n * self.mean) / (self.item_shrinkage + n)

    def user_bias(self, user_id: UserId) -> float:
        """``b_u`` in stars (0 for a user without ratings)."""
        n = self._user_count.get(user_id, 0)
        if n == 0:
            return 0.0
        return (self._user_sum[user_id] - n * self.mean) / (self.user_shrinkage + n)

    def fit(self, ratings: Sequence[RatingSubmitted]) -> None:
        """Replace the state by the exact batch estimate over ``ratings``."""
        self._reset()
        for rating in ratings:
            self._total += rating.rating
            self._count += 1
            movie_id = rating.movie_id
            self._item_sum[movie_id] = self._item_sum.get(movie_id, 0.0) + rating.rating
            self._item_count[movie_id] = self._item_count.get(movie_id, 0) + 1
        item_bias = {movie_id: self.item_bias(movie_id) for movie_id in self._item_count}
        for rating in ratings:
            user_id = rating.user_id
            residual = rating.rating - item_bias[rating.movie_id]
            self._user_sum[user_id] = self._user_sum.get(user_id, 0.0) + residual
            self._user_count[user_id] = self._user_count.get(user_id, 0) + 1

    def learn_one(self, rating: RatingSubmitted) -> None:
        """Add one rating to the running sums (O(1))."""
        user_id, movie_id = rating.user_id, rating.movie_id
        residual = rating.rating - self.item_bias(movie_id)
        self._user_sum[user_id] = self._user_sum.get(user_id, 0.0) + residual
        self._user_count[user_id] = self._user_count.get(user_id, 0) + 1
        self._item_sum[movie_id] = self._item_sum.get(movie_id, 0.0) + rating.rating
        self._item_count[movie_id] = self._item_count.get(movie_id, 0) + 1
        self._total += rating.rating
        self._count += 1

    def predict(self, user_id: UserId, movie_id: MovieId) -> float:
        """Predicted stars, clipped to [0.5, 5]."""
        if self._count == 0:
            return DEFAULT_RATING
        return _clip_rating(self.mean + self.user_bias(user_id) + self.item_bias(movie_id))


class MostPopular:
    """Static popularity: the most-rated movies of TRAIN, the same list for everyone.

    ``recommend`` returns the added movies by descending TRAIN rating count (ties: lower
    add position), skipping ``exclude``; movies without TRAIN ratings come last.
    ``predict_rating`` is a :class:`BiasPredictor` fitted on TRAIN. ``learn_one`` does
    nothing. Nothing is random.

    Args:
        item_shrinkage: bias predictor's item pseudo-count in ratings (default 10).
        user_shrinkage: bias predictor's user pseudo-count in ratings (default 5).
    """

    name = "most-popular"

    def __init__(self, item_shrinkage: float = 10.0, user_shrinkage: float = 5.0) -> None:
        self._items = _ItemIndex()
        self._counts: dict[MovieId, int] = {}
        self._bias = BiasPredictor(item_shrinkage, user_shrinkage)
        self._ranked: list[MovieId] | None = None

    def add_movies(self, movies: Sequence[MoviePublished]) -> None:
        """Make the movies recommendable."""
        for movie in movies:
            self._items.add(movie.movie_id)
        self._ranked = None

    def fit(self, train: Sequence[RatingSubmitted]) -> None:
        """Count TRAIN ratings per movie and fit the bias predictor."""
        self._counts = {}
        for rating in train:
            self._counts[rating.movie_id] = self._counts.get(rating.movie_id, 0) + 1
        self._bias.fit(train)
        self._ranked = None

    def recommend(self, user_id: UserId, exclude: AbstractSet[MovieId], k: int) -> list[MovieId]:
        """The ``k`` most-rated added movies not in ``exclude`` (``user_id`` is unused)."""
        if self._ranked is None:
            # Static scores: rank once, then each call only skips the excluded ones.
            counts = np.array(
                [self._counts.get(movie_id, 0) for movie_id in self._items.added_ids],
                dtype=np.float64,
            )
            self._ranked = top_k(counts, self._items.added_ids, len(counts))
        result: list[MovieId] = []
        if k <= 0:
            return result
        for movie_id in self._ranked:
            if movie_id not in exclude:
                result.append(movie_id)
                if len(result) == k:
                    break
        return result

    def predict_rating(self, user_id: UserId, movie_id: MovieId) -> float:
        """Bias-baseline stars fitted on TRAIN, in [0.5, 5]."""
        return self._bias.predict(user_id, movie_id)

    def learn_one(self, rating: RatingSubmitted) -> None:
        """Static model: test events are not learned."""


class OnlinePopularity:
    """Streaming popularity with exponential forgetting measured in events.

    Before each rating every movie's score decays by ``gamma = 2^(-1/half_life)``, then the
    rated movie's score grows by 1: a rating ``half_life`` events old weighs ½. The decay
    is O(1) per event: instead of shrinking every score, the increment grows by ``1/gamma``
    per event and raw scores are divided by it on read; all raw scores and the increment
    are rescaled together when the increment passes ``1e100`` (before float overflow).
    ``fit`` applies TRAIN in order with the same update as ``learn_one``.

    ``recommend`` ranks the added movies by decayed score (ties: lower add position), the
    same list for everyone. ``predict_rating`` is a :class:`BiasPredictor` updated online
    from every event. Nothing is random.

    Args:
        half_life: events after which a rating's weight halves (default 5,000, > 0;
            best NDCG@10 of 1,000 / 2,000 / 5,000 / 10,000 on a validation split of TRAIN).
        item_shrinkage: bias predictor's item pseudo-count in ratings (default 10).
        user_shrinkage: bias predictor's user pseudo-count in ratings (default 5).
    """

    name = "online-popularity"

    _RENORMALISE_AT = 1e100

    def __init__(
        self,
        half_life: float = 5_000.0,
        item_shrinkage: float = 10.0,
        user_shrinkage: float = 5.0,
    ) -> None:
        if not half_life > 0:
            raise ValueError("half_life must be > 0 events")
        self.half_life = half_life
        self._growth = 2.0 ** (1.0 / half_life)  # 1/gamma
        self._increment = 1.0
        self._raw: FloatArray = np.zeros(0, dtype=np.float64)
        self._items = _ItemIndex()
        self._bias = BiasPredictor(item_shrinkage, user_shrinkage)

    def add_movies(self, movies: Sequence[MoviePublished]) -> None:
        """Make the movies recommendable (score 0 until rated)."""
        for movie in movies:
            self._items.add(movie.movie_id)
        self._raw = grow_rows(self._raw, len(self._items))

    def fit(self, train: Sequence[RatingSubmitted]) -> None:
        """Apply the TRAIN ratings in order, exactly as ``learn_one`` would."""
        for rating in train:
            self.learn_one(rating)

    def scores(self) -> dict[MovieId, float]:
        """Every known movie's decayed score: Σ over its ratings of gamma^(events since)."""
        raw = self._raw[: len(self._items)] / self._increment
        return {movie_id: float(raw[row]) for movie_id, row in self._items.rows.items()}

    def recommend(self, user_id: UserId, exclude: AbstractSet[MovieId], k: int) -> list[MovieId]:
        """The ``k`` added movies with the highest decayed score not in ``exclude``."""
        return top_k(self._raw[self._items.added_rows], self._items.added_ids, k, exclude)

    def predict_rating(self, user_id: UserId, movie_id: MovieId) -> float:
        """Bias-baseline stars from every event so far, in [0.5, 5]."""
        return self._bias.predict(user_id, movie_id)

    def learn_one(self, rating: RatingSubmitted) -> None:
        """Decay all scores by gamma and add 1 to the rated movie's, in O(1)."""
        row = self._items.row(rating.movie_id)
        self._raw = grow_rows(self._raw, row + 1)
        self._increment *= self._growth
        self._raw[row] += self._increment
        if self._increment > self._RENORMALISE_AT:
            self._raw /= self._increment
            self._increment = 1.0
        self._bias.learn_one(rating)


class OnlineMF:
    """Streaming matrix factorisation, one SGD update per event (two separate models).

    Ranking — online BPR (Rendle et al. 2009, run as a stream as in Vinagre et al. 2014):
    user factors ``P``, item factors ``Q`` (``dim`` columns, new rows drawn from
    N(0, ``init_std``²) when a user or movie is first seen) and an item bias ``b``.
    For a rating (u, i) of any value, ``n_negatives`` distinct added movies ``j`` that u
    has not rated are drawn uniformly, and one SGD step (all gradients taken at the
    values before the step) ascends
    ``Σ_j [ln sigmoid(x_ui - x_uj) - l2/2·(‖q_j‖² + b_j²)] - l2/2·(‖p_u‖² + ‖q_i‖² + b_i²)``
    with ``x_ui = p_u·q_i + b_i`` and learning rate ``lr``. ``recommend`` is the top-k of
    ``Q p_u + b`` over the added movies minus ``exclude``; a user never seen gets the
    added movies by the model's own rating counts (ties: lower add position).

    Rating — biased MF regression (Koren 2009) with its own factors ``P'``, ``Q'``
    (``rating_dim`` columns): ``r̂ = μ + b_u + b_i + p'_u·q'_i``, clipped to [0.5, 5]
    stars, with ``μ`` the running mean of the ratings seen; one SGD step on the squared
    error per event with ``rating_lr`` and ``rating_l2``. Separate factors because the
    two losses pull the scale of the factors in different directions.

    ``fit`` runs ``fit_epochs`` passes over TRAIN in order (counts, ``μ`` and the users'
    rated sets come from the first pass only); ``learn_one`` then applies each TEST event
    once. Factors are float64; a non-finite score or error raises :class:`NumericalError`.

    The learning rates were picked on a validation split of TRAIN (fit on its first
    64,000 ratings, replay the next 16,000 as in T1), never on the TEST stream.

    Args:
        dim: ranking factors per user and movie (default 32).
        lr: BPR learning rate (default 0.1).
        l2: BPR L2 weight per update (default 0.01).
        n_negatives: negatives sampled per event (default 4).
        rating_dim: regression factors per user and movie (default 16).
        rating_lr: regression learning rate (default 0.03).
        rating_l2: regression L2 weight per update (default 0.05).
        init_std: standard deviation of new factor rows (default 0.1).
        fit_epochs: passes over TRAIN in ``fit`` (default 3, >= 1).
        seed: seeds the factor initialisation and the negative sampling (default 0).
    """

    name = "online-mf"

    def __init__(
        self,
        dim: int = 32,
        lr: float = 0.1,
        l2: float = 0.01,
        n_negatives: int = 4,
        rating_dim: int = 16,
        rating_lr: float = 0.03,
        rating_l2: float = 0.05,
        init_std: float = 0.1,
        fit_epochs: int = 3,
        seed: int = 0,
    ) -> None:
        if dim < 1 or rating_dim < 1 or n_negatives < 1 or fit_epochs < 1:
            raise ValueError("dim, rating_dim, n_negatives and fit_epochs must be >= 1")
        self.dim = dim
        self.lr = lr
        self.l2 = l2
        self.n_negatives = n_negatives
        self.rating_dim = rating_dim
        self.rating_lr = rating_lr
        self.rating_l2 = rating_l2
        self.init_std = init_std
        self.fit_epochs = fit_epochs
        self.seed = seed
        self._rng = np.random.default_rng(seed)
        self._items = _ItemIndex()
        self._users: dict[UserId, int] = {}
        self._rated: list[set[int]] = []  # per user row: item rows rated
        self._n_item_rows = 0  # rows of the item arrays in use (capacity may be larger)
        self._counts: FloatArray = np.zeros(0)
        # Ranking model.
        self._p: FloatArray = np.zeros((0, dim))
        self._q: FloatArray = np.zeros((0, dim))
        self._b: FloatArray = np.zeros(0)
        # Rating model.
        self._total = 0.0
        self._n_ratings = 0
        self._rp: FloatArray = np.zeros((0, rating_dim))
        self._rq: FloatArray = np.zeros((0, rating_dim))
        self._bu: FloatArray = np.zeros(0)
        self._bi: FloatArray = np.zeros(0)

    # Rows -----------------------------------------------------------------------------

    def _item_row(self, movie_id: MovieId) -> int:
        row = self._items.row(movie_id)
        self._grow_items(row + 1)
        return row

    def _grow_items(self, n_items: int) -> None:
        # Bias and count vectors grow by doubling like the factor matrices; only the
        # first len(self._items) entries are meaningful.
        start = self._n_item_rows
        if n_items <= start:
            return
        self._counts = grow_rows(self._counts, n_items)
        self._b = grow_rows(self._b, n_items)
        self._bi = grow_rows(self._bi, n_items)
        self._q = grow_rows(self._q, n_items)
        self._rq = grow_rows(self._rq, n_items)
        new = n_items - start
        self._q[start:n_items] = self._rng.normal(0.0, self.init_std, (new, self.dim))
        self._rq[start:n_items] = self._rng.normal(0.0, self.init_std, (new, self.rating_dim))
        self._n_item_rows = n_items

    def _user_row(self, user_id: UserId) -> int:
        row = self._users.get(user_id)
        if row is None:
            row = self._users[user_id] = len(self._users)
            self._p = grow_rows(self._p, row + 1)
            self._rp = grow_rows(self._rp, row + 1)
            self._bu = grow_rows(self._bu, row + 1)
            self._p[row] = self._rng.normal(0.0, self.init_std, self.dim)
            self._rp[row] = self._rng.normal(0.0, self.init_std, self.rating_dim)
            self._rated.append(set())
        return row

    # EvalModel ------------------------------------------------------------------------

    def add_movies(self, movies: Sequence[MoviePublished]) -> None:
        """Make the movies recommendable; a new movie gets fresh random factors."""
        for movie in movies:
            self._items.add(movie.movie_id)
        self._grow_items(len(self._items))

    def fit(self, train: Sequence[RatingSubmitted]) -> None:
        """``fit_epochs`` passes of per-event updates over TRAIN, in order."""
        for epoch in range(self.fit_epochs):
            for rating in train:
                self._update(rating, first_pass=epoch == 0)

    def recommend(self, user_id: UserId, exclude: AbstractSet[MovieId], k: int) -> list[MovieId]:
        """Top-``k`` of ``Q p_u + b`` over the added movies not in ``exclude``."""
        rows = self._items.added_rows
        user = self._users.get(user_id)
        if user is None:
            scores = self._counts[rows]
        else:
            scores = self._q[rows] @ self._p[user] + self._b[rows]
        return top_k(scores, self._items.added_ids, k, exclude)

    def predict_rating(self, user_id: UserId, movie_id: MovieId) -> float:
        """``μ + b_u + b_i + p'_u·q'_i`` in stars, clipped to [0.5, 5]; unknown parts are 0."""
        if self._n_ratings == 0:
            return DEFAULT_RATING
        prediction = self._total / self._n_ratings
        user = self._users.get(user_id)
        item = self._items.rows.get(movie_id)
        if user is not None:
            prediction += self._bu[user]
        if item is not None:
            prediction += self._bi[item]
        if user is not None and item is not None:
            prediction += float(self._rp[user] @ self._rq[item])
        return _clip_rating(float(prediction))

    def learn_one(self, rating: RatingSubmitted) -> None:
        """One SGD step of each model on the event."""
        self._update(rating, first_pass=True)

    # Learning -------------------------------------------------------------------------

    def _update(self, rating: RatingSubmitted, *, first_pass: bool) -> None:
        user = self._user_row(rating.user_id)
        item = self._item_row(rating.movie_id)
        if first_pass:
            self._counts[item] += 1.0
            self._rated[user].add(item)
            self._total += rating.rating
            self._n_ratings += 1
        # Every parameter an update reads enters its score or error, so checking those
        # two catches a NaN or infinity at its first use, for free.
        if not (self._bpr_step(user, item) and self._regression_step(user, item, rating.rating)):
            raise NumericalError(
                f"NaN encountered in {self.name} factors "
                f"user_id={rating.user_id} movie_id={rating.movie_id}"
            )

    def _sample_negatives(self, user: int, item: int) -> IntArray:
        return sample_negatives(
            self._rng, self._items.added_rows, self._rated[user], item, self.n_negatives
        )

    def _bpr_step(self, user: int, item: int) -> bool:
        """One BPR step; False when a score is not finite (nothing is updated then)."""
        negatives = self._sample_negatives(user, item)
        return bpr_step(self._p, self._q, self._b, user, item, negatives, self.lr, self.l2)

    def _regression_step(self, user: int, item: int, stars: float) -> bool:
        """One SGD step on the squared error; False when the error is not finite."""
        mean = self._total / self._n_ratings if self._n_ratings else DEFAULT_RATING
        p_u = self._rp[user].copy()
        q_i = self._rq[item]
        error = stars - float(mean + self._bu[user] + self._bi[item] + p_u @ q_i)
        if not math.isfinite(error):
            return False
        lr, l2 = self.rating_lr, self.rating_l2
        self._bu[user] += lr * (error - l2 * self._bu[user])
        self._bi[item] += lr * (error - l2 * self._bi[item])
        self._rp[user] += lr * (error * q_i - l2 * p_u)
        self._rq[item] += lr * (error * p_u - l2 * q_i)
        return True
