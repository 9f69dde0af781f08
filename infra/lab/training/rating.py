"""The rating predictor's checkpoint writer and its prequential RMSE.

``shared.models.rating`` fits the item factors (``fit_rating_factors``) and serves the
predictor (``RatingModel``, ``load_rating_model``); ``save_rating_model`` writes a fit
as a ``rating-model`` checkpoint, and ``prequential_rmse`` scores a model on later
ratings as the recommender would predict them.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from infra.lab.training.checkpoint import save_checkpoint
from shared.events import RatingSubmitted
from shared.models.checkpoint import state_digest
from shared.models.item_stats import ItemStats
from shared.models.rating import (
    KIND,
    VERSION_PREFIX,
    RatingFit,
    RatingModel,
    RatingParams,
    load_rating_model,
)
from shared.types import MovieId


def save_rating_model(
    directory: Path, fit: RatingFit, params: RatingParams, extra: dict[str, Any]
) -> RatingModel:
    """Write the fit as a ``rating-model`` checkpoint; returns the model as it loads."""
    arrays = fit_arrays(fit)
    version = rating_version(arrays, params)
    config = {
        **extra,
        **fit.config,
        "params": asdict(params),
        "movie_ids": list(fit.movie_ids),
        "kind": KIND,
        "version": version,
    }
    save_checkpoint(directory, arrays, config)
    return load_rating_model(directory)


def fit_arrays(fit: RatingFit) -> dict[str, np.ndarray]:
    """The fitted arrays as the checkpoint stores them: per TRAIN movie (``movie_ids`` in
    the config give the order) a row of factors and its ``keep`` most similar movies by
    co-rating (rows, similarities; similarity 0 pads)."""
    return {
        "factors": np.ascontiguousarray(fit.factors, dtype=np.float32),
        "neighbour_rows": np.ascontiguousarray(fit.neighbour_rows, dtype=np.int64),
        "neighbour_similarity": np.ascontiguousarray(fit.neighbour_similarity, dtype=np.float32),
    }


def rating_version(arrays: dict[str, np.ndarray], params: RatingParams) -> str:
    """``fold-in-v2-<8 hex>``: a digest of the fitted arrays and the settings, so new
    settings on the same fit publish a new version."""
    digest = hashlib.sha256(state_digest(arrays).encode())
    digest.update(json.dumps(asdict(params), sort_keys=True).encode())
    return f"{VERSION_PREFIX}-{digest.hexdigest()[:8]}"


def prequential_rmse(
    model: RatingModel,
    train: Sequence[RatingSubmitted],
    test: Sequence[RatingSubmitted],
    vectors: dict[MovieId, np.ndarray],
    item_stats: ItemStats,
) -> float:
    """RMSE of ``model`` on ``test`` in time order, each rating predicted before it is
    learned (``item_stats``, fresh, and the users' histories learn ``train`` first), as
    the recommender predicts it. ``vectors`` are the movies' L2-normalised item vectors.

    Raises:
        ValueError: ``test`` is empty.
    """
    if not test:
        raise ValueError("no test ratings")
    rated: dict[str, dict[MovieId, float]] = {}

    def learn(r: RatingSubmitted) -> None:
        item_stats.learn_one(r.movie_id, r.rating, r.occurred_at)
        rated.setdefault(r.user_id, {})[r.movie_id] = r.rating

    for r in train:
        learn(r)
    dim = len(next(iter(vectors.values())))
    squared = 0.0
    for r in test:
        history = rated.get(r.user_id, {})
        movies = list(history)
        predicted = model.predict(
            item_stats,
            movies,
            list(history.values()),
            np.array([vectors[m] for m in movies]).reshape(-1, dim),
            [r.movie_id],
            vectors[r.movie_id][None, :],
        )[0]
        squared += (predicted - r.rating) ** 2
        learn(r)
    return math.sqrt(squared / len(test))
