"""The one interface every model under evaluation implements.

The harness (``infra.lab.evaluation.harness``) drives a model through protocol T1:

1. ``add_movies`` with the catalogue known at the start (all movies, or in the
   "items arrive mid-stream" variant only those rated in TRAIN);
2. ``fit`` with the TRAIN ratings in time order;
3. per TEST event, in time order: ``add_movies`` for a movie arriving just before its
   first rating (mid-stream variant only), then ``recommend`` and ``predict_rating``
   (test), then ``learn_one`` (learn).

Static models learn only in ``fit`` and ignore ``learn_one``; streaming models learn
from every event. The harness, not the model, keeps what each user has rated and passes
it as ``exclude``; a model never returns an excluded movie, nor one that has not been
added.
"""

from __future__ import annotations

from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from typing import Protocol, runtime_checkable

from shared.events import MoviePublished, RatingSubmitted
from shared.types import MovieId, UserId

DEFAULT_RATING = 3.5
"""Stars predicted when a model knows nothing (about the ML-100K mean, 3.53)."""


@runtime_checkable
class EvalModel(Protocol):
    """A recommender as protocol T1 sees it (``learn_one`` / ``recommend`` after river)."""

    name: str
    """Short name used in reports, e.g. ``"most-popular"``."""

    def add_movies(self, movies: Sequence[MoviePublished]) -> None:
        """Make movies recommendable (content models embed them here). A movie added
        twice is replaced by its latest version."""
        ...

    def fit(self, train: Sequence[RatingSubmitted]) -> None:
        """Learn from the TRAIN ratings, given in time order. Called once, after the
        first ``add_movies``; a streaming model usually applies them as it would online."""
        ...

    def recommend(self, user_id: UserId, exclude: AbstractSet[MovieId], k: int) -> list[MovieId]:
        """The user's current top-``k`` list, best first: at most ``k`` distinct added
        movies, none of them in ``exclude``. An unknown user gets the model's cold-start
        list (possibly empty)."""
        ...

    def predict_rating(self, user_id: UserId, movie_id: MovieId) -> float:
        """The stars the user is predicted to give the movie (any user, any movie)."""
        ...

    def learn_one(self, rating: RatingSubmitted) -> None:
        """Apply one TEST rating after it has been scored (a no-op for static models)."""
        ...
