"""The read API (FastAPI; OpenAPI docs at ``/docs``).

- ``GET /users/{user_id}/recommendations``: the user's current list, with titles,
  scores and predicted ratings; a user with no list yet gets the newcomers' list,
  marked ``for_newcomers``.
- ``GET /users/{user_id}``: the user's profile (ratings, recent movies, when the vector
  last moved); 404 for a user who has not rated.
- ``GET /movies/{movie_id}``: the movie as served; 404 for an unknown one.
- ``GET /movies/{movie_id}/similar?k=10&genre=&year=``: "more like this" from Qdrant.
- ``GET /dashboard``: the live dashboard (lists as they stream, throughput and latency,
  lag, dead letters, a user's trajectory among the movies), fed by ``/dashboard/data``
  and ``/dashboard/space``.
- ``GET /healthz``: the process answers; ``GET /readyz``: 200 once every view has read
  its topic, 503 before.
"""

from __future__ import annotations

from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Annotated

import numpy as np
from fastapi import FastAPI, HTTPException, Query, Response
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, Field

from shared.events import NEWCOMERS_USER_ID, RecommendedItem
from shared.read.activity import project
from shared.read.views import ReadViews

MAX_SIMILAR = 100


class RecommendationsOut(BaseModel):
    user_id: str
    for_newcomers: bool = Field(
        description="True when the user has no list yet and this is the newcomers' list"
    )
    items: list[RecommendedItem]
    model_version: str
    generated_at: datetime
    cause_event_id: str
    latency_ms: float


class RatedOut(BaseModel):
    movie_id: str
    title: str | None
    rating: float | None


class UserOut(BaseModel):
    user_id: str
    n_ratings: int
    mean_rating: float
    recent: list[RatedOut] = Field(description="The latest rated movies, newest first")
    vector_updated_at: datetime
    model_version: str
    cause_event_id: str


class MovieOut(BaseModel):
    movie_id: str
    title: str
    year: int | None
    genres: list[str]
    modalities: list[str]
    model_version: str
    embedded_at: datetime
    online_ratings: int


class SimilarItem(BaseModel):
    movie_id: str
    title: str | None
    year: int | None
    genres: list[str]
    score: float = Field(description="Cosine similarity of the served item vectors")


class SimilarOut(BaseModel):
    movie_id: str
    items: list[SimilarItem]


def create_app(views: ReadViews) -> FastAPI:
    """The API over ``views`` (started by the caller)."""
    app = FastAPI(
        title="reelstream read API",
        summary="Current recommendation lists, movies and their neighbours",
    )

    @app.get("/users/{user_id}/recommendations")
    def recommendations(user_id: str) -> RecommendationsOut:
        found = views.recommendations(user_id)
        for_newcomers = found is None
        if found is None:
            found = views.recommendations(NEWCOMERS_USER_ID)
        if found is None:
            raise HTTPException(404, f"no list for user {user_id!r} yet, nor a newcomers' list")
        return RecommendationsOut(
            user_id=user_id,
            for_newcomers=for_newcomers,
            items=found.items,
            model_version=found.model_version,
            generated_at=found.generated_at,
            cause_event_id=found.cause_event_id,
            latency_ms=found.latency_ms,
        )

    @app.get("/users/{user_id}")
    def user(user_id: str) -> UserOut:
        profile = views.profile(user_id)
        if profile is None:
            raise HTTPException(404, f"user {user_id!r} has not rated any movie")
        stars: list[float | None] = list(profile.ratings) or [None] * len(profile.rated)
        recent = []
        for movie_id, rating in reversed(list(zip(profile.rated, stars, strict=True))):
            movie = views.movie(movie_id)
            recent.append(RatedOut(movie_id=movie_id, title=movie and movie.title, rating=rating))
        return UserOut(
            user_id=user_id,
            n_ratings=profile.n_ratings,
            mean_rating=profile.mean_rating,
            recent=recent,
            vector_updated_at=profile.updated_at,
            model_version=profile.model_version,
            cause_event_id=profile.cause_event_id,
        )

    @app.get("/movies/{movie_id}")
    def movie(movie_id: str) -> MovieOut:
        found = views.movie(movie_id)
        if found is None:
            raise HTTPException(404, f"movie {movie_id!r} is not in the catalogue")
        return MovieOut(
            movie_id=found.movie_id,
            title=found.title,
            year=found.year,
            genres=list(found.genres),
            modalities=list(found.modalities),
            model_version=found.model_version,
            embedded_at=found.embedded_at,
            online_ratings=found.online_ratings,
        )

    @app.get("/movies/{movie_id}/similar")
    def similar(
        movie_id: str,
        k: Annotated[int, Query(ge=1, le=MAX_SIMILAR)] = 10,
        genre: str | None = None,
        year: int | None = None,
    ) -> SimilarOut:
        if views.movie(movie_id) is None:
            raise HTTPException(404, f"movie {movie_id!r} is not in the catalogue")
        items = []
        for other, score in views.similar(movie_id, k, genre=genre, year=year):
            found = views.movie(other)
            items.append(
                SimilarItem(
                    movie_id=other,
                    title=found and found.title,
                    year=found and found.year,
                    genres=list(found.genres) if found else [],
                    score=score,
                )
            )
        return SimilarOut(movie_id=movie_id, items=items)

    page = (Path(__file__).parent / "dashboard.html").read_text()

    @app.get("/dashboard", response_class=HTMLResponse)
    def dashboard() -> str:
        """The live dashboard: one page, no build step; it polls the two routes below."""
        return page

    @app.get("/dashboard/data")
    def dashboard_data(after: int = 0) -> dict[str, object]:
        """Lists published since feed item ``after``, the per-second series, the lag of
        each stream processor and the dead letters."""
        activity = views.activity
        return {
            "feed": [asdict(item) for item in activity.feed(after)],
            "series": activity.series(),
            "lag": views.lag(),
            "dead_letters": activity.letters(),
            "counts": views.counts(),
        }

    @app.get("/dashboard/space")
    def dashboard_space(user: str = "") -> dict[str, object]:
        """The movies and ``user``'s recent vectors on the catalogue's first two
        principal components."""
        movie_ids, vectors = views.movie_vectors()
        path = views.activity.trajectory(user) if user else []
        trajectory = np.stack(path) if path else np.zeros((0, vectors.shape[1] or 1))
        movies_2d, path_2d = project(vectors, trajectory)
        titles = [(found.title if (found := views.movie(m)) else m) for m in movie_ids]
        return {
            "user": user or None,
            "movies": [
                [round(x, 4), round(y, 4), t]
                for (x, y), t in zip(movies_2d.tolist(), titles, strict=True)
            ],
            "trajectory": [[round(x, 4), round(y, 4)] for x, y in path_2d.tolist()],
        }

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "alive"}

    @app.get("/readyz")
    def readyz(response: Response) -> dict[str, object]:
        ready = views.ready()
        if not ready:
            response.status_code = 503
        return {"ready": ready, **views.counts()}

    return app
