"""Protocol T1, in process: test-then-learn over the TEST stream, in event order.

``evaluate`` drives any ``EvalModel`` (see ``infra.lab.evaluation.model``) and scores every
test event with a ``Scoreboard``. ``mmr_sweep`` re-ranks the pipeline model's recorded
profiles at several MMR lambdas with the recommender's own ``recommend_batch``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from tqdm import tqdm

from infra.lab.evaluation.metrics import K, Scoreboard, genre_vectors
from infra.lab.evaluation.model import EvalModel
from infra.lab.evaluation.pipeline import EvaluationError, PipelineModel, Snapshot
from infra.lab.evaluation.split import Split, arrivals
from shared.events import MoviePublished
from shared.models.recommend import recommend_batch
from shared.types import MovieId, UserId

log = logging.getLogger(__name__)

Variant = Literal["all-items", "mid-stream"]
VARIANTS: tuple[Variant, ...] = ("all-items", "mid-stream")
"""``all-items``: every movie is in the catalogue from the start. ``mid-stream``: a movie
whose first rating is in TEST is added just before that rating, as a new release."""

SWEEP_CHUNK = 512
"""Profiles re-ranked per ``recommend_batch`` call in the MMR sweep."""


@dataclass
class ModelRun:
    """One model's result on one variant of the protocol."""

    name: str
    variant: Variant
    summary: dict[str, Any]
    """``Scoreboard.summary()``."""
    ndcg_series: np.ndarray
    """Per-event NDCG@k in stream order (for the rolling plot)."""
    fit_s: float
    """Wall seconds of ``add_movies`` (the starting catalogue) and ``fit``."""
    test_s: float
    """Wall seconds of the test-then-learn loop."""
    lists: list[list[MovieId]] | None = None
    """Per test event, the list it was scored against (``keep_lists=True`` only)."""
    predictions: list[float] | None = None
    """Per test event, the predicted rating (``keep_lists=True`` only)."""
    snapshots: list[Snapshot | None] = field(default_factory=list)
    """Per test event, the profile its list came from (``PipelineModel`` only)."""
    newcomer_lists: dict[int, list[MovieId]] = field(default_factory=dict)
    """The lists of the test events whose user had no profile yet (the newcomers' list,
    which no profile or MMR lambda changes), by event index (``PipelineModel`` only)."""

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: name, variant, timings and the summary."""
        return {
            "model": self.name,
            "variant": self.variant,
            "fit_s": round(self.fit_s, 3),
            "test_s": round(self.test_s, 3),
            **self.summary,
        }


def initial_movies(
    movies: Sequence[MoviePublished], split: Split, variant: Variant
) -> tuple[list[MoviePublished], dict[int, list[MoviePublished]]]:
    """The catalogue at the start, and the movies added just before test event ``i``."""
    if variant == "all-items":
        return list(movies), {}
    if variant != "mid-stream":
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
    first = arrivals(split)
    later: dict[int, list[MoviePublished]] = {}
    start: list[MoviePublished] = []
    for movie in movies:
        if movie.movie_id in first:
            later.setdefault(first[movie.movie_id], []).append(movie)
        else:
            start.append(movie)
    return start, later


def evaluate(
    model: EvalModel,
    movies: Sequence[MoviePublished],
    split: Split,
    *,
    k: int = K,
    variant: Variant = "all-items",
    test_limit: int | None = None,
    keep_lists: bool = False,
    progress: bool = True,
) -> ModelRun:
    """Run protocol T1 on ``model``: start catalogue, ``fit(TRAIN)``, then per TEST event
    (the first ``test_limit``, or all) score the current list and predicted rating and
    only then ``learn_one``.

    Each list is checked against the model contract: at most ``k`` distinct movies, all
    in the catalogue, none rated by the user before the event.

    Raises:
        EvaluationError: the model broke its contract (the message names the event).
    """
    start_movies, later = initial_movies(movies, split, variant)
    test = split.test if test_limit is None else split.test[:test_limit]
    board = Scoreboard(k=k, catalogue_size=len(movies), genre_vectors=genre_vectors(movies))
    seen: dict[UserId, set[MovieId]] = {}
    for rating in split.train:
        seen.setdefault(rating.user_id, set()).add(rating.movie_id)
    known: set[MovieId] = {m.movie_id for m in start_movies}
    lists: list[list[MovieId]] = []
    predictions: list[float] = []
    snapshots: list[Snapshot | None] = []
    newcomer_lists: dict[int, list[MovieId]] = {}
    pipeline = model if isinstance(model, PipelineModel) else None

    began = time.perf_counter()
    model.add_movies(start_movies)
    model.fit(split.train)
    fit_s = time.perf_counter() - began
    log.info("model=%s variant=%s fit_s=%.1f", model.name, variant, fit_s)

    began = time.perf_counter()
    bar = tqdm(test, desc=f"{model.name} ({variant})", unit="ev", disable=not progress)
    for i, rating in enumerate(bar):
        arriving = later.get(i)
        if arriving:
            model.add_movies(arriving)
            known.update(m.movie_id for m in arriving)
        user, movie = rating.user_id, rating.movie_id
        rated = seen.setdefault(user, set())
        recommended = model.recommend(user, rated, k)
        _check_list(model.name, i, recommended, k, rated, known)
        predicted = model.predict_rating(user, movie)
        if not np.isfinite(predicted):
            raise EvaluationError(f"{model.name}: test event {i}: predicted rating {predicted}")
        board.add(
            recommended=recommended,
            target=movie,
            rating=rating.rating,
            predicted=predicted,
            cold_user=split.is_cold_user(user),
            cold_item=split.is_cold_item(movie),
        )
        if keep_lists:
            lists.append(recommended)
            predictions.append(predicted)
        if pipeline is not None:
            snapshot = pipeline.snapshot(user)
            snapshots.append(snapshot)
            if snapshot is None:
                newcomer_lists[i] = recommended
        model.learn_one(rating)
        rated.add(movie)
    test_s = time.perf_counter() - began
    summary = board.summary()
    log.info(
        "model=%s variant=%s events=%d ndcg=%.4f hr=%.4f test_s=%.1f",
        model.name,
        variant,
        summary["n_events"],
        summary["segments"]["all"]["ndcg"] or 0.0,
        summary["segments"]["all"]["hr"] or 0.0,
        test_s,
    )
    return ModelRun(
        name=model.name,
        variant=variant,
        summary=summary,
        ndcg_series=board.ndcg_series,
        fit_s=fit_s,
        test_s=test_s,
        lists=lists if keep_lists else None,
        predictions=predictions if keep_lists else None,
        snapshots=snapshots,
        newcomer_lists=newcomer_lists,
    )


def _check_list(
    name: str,
    i: int,
    recommended: Sequence[MovieId],
    k: int,
    rated: set[MovieId],
    known: set[MovieId],
) -> None:
    problem = ""
    if len(recommended) > k:
        problem = f"{len(recommended)} items, more than k={k}"
    elif len(set(recommended)) != len(recommended):
        problem = "a movie appears twice"
    elif rated.intersection(recommended):
        problem = f"already rated: {sorted(rated.intersection(recommended))[:5]}"
    elif not known.issuperset(recommended):
        problem = f"not in the catalogue: {sorted(set(recommended) - known)[:5]}"
    if problem:
        raise EvaluationError(f"{name}: test event {i}: list breaks the contract ({problem})")


def mmr_sweep(
    model: PipelineModel,
    run: ModelRun,
    movies: Sequence[MoviePublished],
    split: Split,
    lambdas: Sequence[float],
    *,
    k: int = K,
) -> list[dict[str, Any]]:
    """Score ``run``'s recorded profiles re-ranked at each MMR lambda.

    The user vectors do not depend on lambda, so each test event's profile (recorded by
    ``evaluate``) is re-ranked with the recommender's ``recommend_batch`` over the
    model's final catalogue; an event whose user had no profile keeps its newcomers'
    list. Meaningful for the ``all-items`` variant, whose catalogue never changes; at the
    deployed lambda it reproduces ``run`` exactly.

    Returns:
        Per lambda: ``{"mmr_lambda", "hr", "ndcg", "ild", "coverage"}``.
    """
    if run.variant != "all-items":
        raise ValueError("the MMR sweep needs the all-items variant (a fixed catalogue)")
    test = split.test[: len(run.snapshots)]
    present = [i for i, s in enumerate(run.snapshots) if s is not None]
    settings = model.settings
    points: list[dict[str, Any]] = []
    for lambda_ in lambdas:
        board = Scoreboard(k=k, catalogue_size=len(movies), genre_vectors=genre_vectors(movies))
        by_event: dict[int, list[MovieId]] = {}
        for start in range(0, len(present), SWEEP_CHUNK):
            rows = present[start : start + SWEEP_CHUNK]
            chosen = [run.snapshots[i] for i in rows]
            lists = recommend_batch(
                np.stack([s.vector for s in chosen if s is not None]),
                [s.rated for s in chosen if s is not None],
                model.catalogue,
                k=k,
                n_candidates=settings.n_candidates,
                mmr_lambda=lambda_,
            )
            for i, scored in zip(rows, lists, strict=True):
                by_event[i] = [item.movie_id for item in scored]
        for i, rating in enumerate(test):
            board.add(
                recommended=by_event.get(i) or run.newcomer_lists.get(i, []),
                target=rating.movie_id,
                rating=rating.rating,
                predicted=None,
                cold_user=split.is_cold_user(rating.user_id),
                cold_item=split.is_cold_item(rating.movie_id),
            )
        summary = board.summary()
        points.append(
            {
                "mmr_lambda": float(lambda_),
                "hr": summary["segments"]["all"]["hr"],
                "ndcg": summary["segments"]["all"]["ndcg"],
                "ild": summary["ild"],
                "coverage": summary["coverage"],
            }
        )
        log.info("mmr_lambda=%.2f ndcg=%s ild=%s", lambda_, points[-1]["ndcg"], points[-1]["ild"])
    return points
