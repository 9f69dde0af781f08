"""``make train``: the fusion item encoder, the residual user updater and the two-tower
ranker, trained on TRAIN only (protocol T1), written as versioned checkpoints.

    python -m infra.lab.train [--models-dir models] [--seed 0] [--quiet] [--stage rating-model]

Stages, each on the previous one's output:

1. item encoder: ``train_fusion`` on the catalogue's content and the first 90% of
   TRAIN;
2. user updater: ``train_residual`` on the first 90% of TRAIN, the epoch chosen on the
   last 10% (``Split.validation``), over the trained encoder's vectors;
3. ranker: TRAIN replayed in time order through the trained updater and the online
   features gives one example per rating (profile, features and the recommender's
   candidates *before* it); ``train_ranker`` on the examples of the last 30% of the
   first 90% (``RANKER_RECENT_SHARE``), the epoch chosen on the last 10%;
4. rating model: ``fit_rating_factors`` (item factors by ALS) on the first 90% of
   TRAIN; its prequential RMSE on the last 10% is recorded next to the ranker's rating
   head's.

The updater, ranker and rating-model configs record the item encoder's version they were trained on
(``item_encoder_version``); the services refuse them with any other encoder. Writes
``models/{item-encoder,user-updater,ranker,rating-model}/``, ``reports/train.json``,
``reports/train-losses.png`` and ``reports/embedding-space.png``. TEST is never read.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch
from tqdm import tqdm

from infra.lab.evaluation.report import write_json
from infra.lab.evaluation.split import Split, temporal_split
from infra.lab.training.fusion import save_fusion, train_fusion
from infra.lab.training.ranker import ExampleBuilder, RankerExamples, save_ranker, train_ranker
from infra.lab.training.rating import prequential_rmse, save_rating_model
from infra.lab.training.residual import save_residual, train_residual, updater_of
from shared.config import Settings
from shared.convert import movies_of, ratings_of
from shared.data.movielens import ML100K_GENRES, MovieLens, load_movielens
from shared.events import ItemEmbedded, RatingSubmitted
from shared.exceptions import ConfigurationError
from shared.logs import log_above_progress_bars
from shared.models.checkpoint import read_config
from shared.models.deployed import (
    ITEM_ENCODER,
    RANKER,
    RANKER_KIND,
    RATING_MODEL,
    USER_UPDATER,
)
from shared.models.device import resolve_device
from shared.models.fusion import KIND as FUSION_KIND
from shared.models.fusion import FusionItemEncoder, encode_catalogue, load_fusion_encoder
from shared.models.image import load_image_encoder
from shared.models.item_stats import ItemStats, co_rated
from shared.models.rating import RatingParams, fit_rating_factors
from shared.models.recommend import CandidateSources, retrieve_batch
from shared.models.residual import KIND as RESIDUAL_KIND
from shared.models.residual import load_residual_updater
from shared.models.text import TextEncoder
from shared.models.updater import UserState, UserUpdater
from shared.retrieval.catalogue import Catalogue
from shared.types import Matrix, MovieId, UserId

log = logging.getLogger("infra.lab.train")

RANKER_RECENT_SHARE = 0.3
"""The ranker learns from the last 30% of the fit window's ratings only. The replay
still starts at the first rating, so the earlier ones warm up the profiles and the
online features (``ItemStats``) first: the examples then look like what
the recommender scores after all of TRAIN. Chosen on validation (NDCG@10 among the
candidates, four epochs: 0.1240 from every rating, 0.1239 from the last 70%, 0.1253
from the last 50%, 0.1255 from the last 30% (0.1252 and 0.1253 with two other seeds),
0.1250 from the last 20%)."""

STAGES = ("item-encoder", "user-updater", "ranker", "rating-model")
"""The stages in training order; ``--stage`` starts from one of them."""


def stage_config(models_dir: Path, stage: str, kind: str, encoder_version: str) -> dict[str, Any]:
    """The config of a stage's checkpoint that is loaded rather than retrained.

    Raises:
        ConfigurationError: it was trained on another item encoder than ``encoder_version``.
    """
    config = read_config(models_dir / stage, kind)
    if config.get("item_encoder_version") != encoder_version:
        raise ConfigurationError(
            f"{models_dir / stage} was trained on item encoder "
            f"{config.get('item_encoder_version')}, not {encoder_version}: "
            f"retrain from --stage {stage}"
        )
    return config


def catalogue_of(
    dataset: MovieLens, ids: Sequence[MovieId], vectors: Matrix, version: str
) -> Catalogue:
    """The recommender's catalogue of the encoded movies, as ``item-embeddings`` fills it."""
    movies = {m.movie_id: m for m in dataset.movies}
    now = datetime.now(UTC)
    catalogue = Catalogue()
    refused = catalogue.apply(
        [
            ItemEmbedded(
                movie_id=movie_id,
                title=movies[movie_id].title,
                year=movies[movie_id].year,
                genres=movies[movie_id].genres,
                vector=vectors[row],
                modalities=["text"],
                model_version=version,
                embedded_at=now,
            )
            for row, movie_id in enumerate(ids)
        ]
    )
    if refused:
        raise ValueError(f"catalogue refused {len(refused)} item vector(s): {refused[0].error}")
    return catalogue


def ranker_examples(
    ratings: Sequence[RatingSubmitted],
    updater: UserUpdater,
    catalogue: Catalogue,
    rows: dict[MovieId, int],
    item_vectors: Matrix,
    sources: CandidateSources,
    n_candidates: int,
    progress: bool = False,
    first: int = 0,
) -> tuple[RankerExamples, list[int]]:
    """Replay ``ratings`` in order through ``updater`` and the online features of
    ``sources`` (``ItemStats``); one example per rating from position
    ``first`` on of a user who already has a profile: their state and features before
    the rating, and the candidates the recommender would have scored for them then
    (``retrieve_batch``, the recommender's own function). The ratings before ``first``
    only move the profiles and the features.

    Returns the examples and, per example, the index of its rating in ``ratings``.
    """
    builder = ExampleBuilder()
    states: dict[UserId, UserState] = {}
    rated: dict[UserId, list[MovieId]] = {}
    rated_sets: dict[UserId, set[MovieId]] = {}
    positions: list[int] = []
    for position, rating in enumerate(tqdm(ratings, desc="ranker examples", disable=not progress)):
        row = rows.get(rating.movie_id)
        if row is None:
            continue
        user = rating.user_id
        state = states.get(user) or updater.initial_state()
        vector = updater.vector(state)
        if vector is not None and position >= first:
            history = rated.get(user, [])
            ((candidates, _),) = retrieve_batch(
                vector[None, :],
                [rated_sets.get(user, set())],
                catalogue,
                n_candidates,
                sources,
                [history],
            )
            user_features = sources.user_features(
                [state.n_ratings], [updater.mean_rating(state)], [history]
            )
            builder.add(
                vector,
                user_features[0],
                row,
                sources.features(catalogue, [rating.movie_id], history)[0],
                rating.rating,
                [rows[c] for c in candidates],
                sources.features(catalogue, candidates, history),
            )
            positions.append(position)
        states[user] = updater.learn_one(
            state, item_vectors[row], rating.rating, rating.occurred_at
        )
        history = rated.setdefault(user, [])
        sources.learn([rating], [co_rated(history, rating.movie_id)])
        if rating.movie_id not in rated_sets.setdefault(user, set()):
            history.append(rating.movie_id)
            rated_sets[user].add(rating.movie_id)
    return builder.build(), positions


def plot_losses(histories: dict[str, dict[str, list[float]]], path: Path) -> None:
    """One panel per stage: every per-epoch loss and RMSE curve it recorded, and on a
    second axis (dashed) its validation NDCG@10 curves, e.g. the ranker's against the
    same candidates in plain cosine order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(histories), figsize=(5.5 * len(histories), 5), dpi=110)
    for ax, (stage, history) in zip(np.atleast_1d(axes), histories.items(), strict=True):
        for name, values in history.items():
            if values and ("loss" in name or "rmse" in name):
                ax.plot(range(1, len(values) + 1), values, marker="o", label=name)
        handles, labels = ax.get_legend_handles_labels()
        ndcg = {name: values for name, values in history.items() if values and "ndcg" in name}
        if ndcg:
            twin = ax.twinx()
            for name, values in ndcg.items():
                twin.plot(range(1, len(values) + 1), values, linestyle="--", marker="x", label=name)
            twin.set_ylabel("validation NDCG@10 (dashed)")
            more = twin.get_legend_handles_labels()
            handles, labels = handles + more[0], labels + more[1]
        ax.set_title(stage)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(
            handles, labels, fontsize=7, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.15)
        )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_embedding(
    dataset: MovieLens,
    ids: list[MovieId],
    vectors: Matrix,
    updater: UserUpdater,
    train: Sequence[RatingSubmitted],
    path: Path,
) -> UserId:
    """2-D PCA of the item vectors coloured by primary genre, with the trajectory of
    the TRAIN user with the most ratings (their vector after each rating, projected
    the same way). Returns that user's id."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    centred = vectors - vectors.mean(axis=0)
    _, _, vt = np.linalg.svd(centred.astype(np.float64), full_matrices=False)
    axes2 = vt[:2].T
    points = centred @ axes2
    genre_of = {m.movie_id: (m.genres[0] if m.genres else "unknown") for m in dataset.movies}
    fig, ax = plt.subplots(figsize=(9, 7), dpi=110)
    cmap = plt.get_cmap("tab20")
    for g, genre in enumerate(ML100K_GENRES):
        mask = np.array([genre_of.get(m) == genre for m in ids])
        if mask.any():
            ax.scatter(points[mask, 0], points[mask, 1], s=8, color=cmap(g % 20), label=genre)
    counts: dict[UserId, int] = {}
    for r in train:
        counts[r.user_id] = counts.get(r.user_id, 0) + 1
    user = max(sorted(counts), key=lambda u: counts[u])
    rows = {m: i for i, m in enumerate(ids)}
    state = updater.initial_state()
    trail: list[np.ndarray] = []
    for r in train:
        if r.user_id != user or r.movie_id not in rows:
            continue
        state = updater.learn_one(state, vectors[rows[r.movie_id]], r.rating, r.occurred_at)
        vector = updater.vector(state)
        if vector is not None:
            trail.append((vector - vectors.mean(axis=0)) @ axes2)
    if trail:
        path_xy = np.stack(trail)
        ax.plot(path_xy[:, 0], path_xy[:, 1], color="black", linewidth=0.8, alpha=0.7)
        ax.scatter(
            path_xy[0, 0],
            path_xy[0, 1],
            color="black",
            marker="s",
            s=40,
            label=f"user {user}: start",
        )
        ax.scatter(
            path_xy[-1, 0],
            path_xy[-1, 1],
            color="black",
            marker="*",
            s=120,
            label=f"user {user}: after {len(trail)} ratings",
        )
    ax.set_title("Item vectors (PCA, coloured by primary genre) and one user's trajectory")
    ax.legend(fontsize=7, ncol=2, markerscale=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return user


def train_all(
    settings: Settings,
    dataset: MovieLens,
    split: Split,
    models_dir: Path,
    reports: Path,
    *,
    seed: int,
    progress: bool,
    start: str = STAGES[0],
) -> dict[str, Any]:
    """Train the stages from ``start`` on (the earlier ones are read from their
    checkpoints in ``models_dir``) and write their checkpoints; returns the training
    record."""
    # Small batches on a shared 2-core machine: one thread was 5-10x faster than two in
    # measurements (two threads busy-wait on each other under load).
    torch.set_num_threads(1)
    record: dict[str, Any] = {"seed": seed, "stages": {}}
    histories: dict[str, dict[str, list[float]]] = {}
    val = split.validation(0.1)
    device = resolve_device(settings.device)
    text = TextEncoder(settings.text_model, device)
    image = load_image_encoder(settings)

    first = STAGES.index(start)
    began = time.perf_counter()
    # Every stage trains on the first 90% of TRAIN, so the last 10% stays unseen for
    # choosing epochs and settings (``make eval VALIDATION=1``).
    if first <= STAGES.index("item-encoder"):
        net, config, history = train_fusion(
            dataset.movies, val.train, text, image, seed=seed, progress=progress
        )
        save_fusion(models_dir / ITEM_ENCODER, net, config)
        encoder = FusionItemEncoder(net, config, text, image)
        histories["item encoder (fusion)"] = history
    else:
        encoder = load_fusion_encoder(models_dir / ITEM_ENCODER, text, image)
        config = read_config(models_dir / ITEM_ENCODER, FUSION_KIND)
    ids, vectors = encode_catalogue(encoder, movies_of(dataset.movies))
    record["stages"]["item_encoder"] = {
        "version": config["version"],
        "seconds": time.perf_counter() - began,
        "trained": first <= STAGES.index("item-encoder"),
    }
    log.info("item encoder %s in %.0f s", config["version"], time.perf_counter() - began)

    began = time.perf_counter()
    if first <= STAGES.index("user-updater"):
        rnet, rconfig, rhistory = train_residual(
            ids, vectors, val.train, validation=val.test, seed=seed, progress=progress
        )
        rconfig["item_encoder_version"] = config["version"]
        save_residual(models_dir / USER_UPDATER, rnet, rconfig)
        updater = updater_of(rnet, rconfig["version"])
        histories["user updater (residual)"] = rhistory
    else:
        rconfig = stage_config(models_dir, "user-updater", RESIDUAL_KIND, config["version"])
        updater = load_residual_updater(models_dir / USER_UPDATER, encoder.dim)
    record["stages"]["user_updater"] = {
        "version": rconfig["version"],
        "seconds": time.perf_counter() - began,
        "trained": first <= STAGES.index("user-updater"),
    }
    log.info("user updater %s in %.0f s", rconfig["version"], time.perf_counter() - began)

    began = time.perf_counter()
    if first <= STAGES.index("ranker"):
        rows = {m: i for i, m in enumerate(ids)}
        sources = CandidateSources(ItemStats())
        examples, positions = ranker_examples(
            split.train,
            updater,
            catalogue_of(dataset, ids, vectors, config["version"]),
            rows,
            vectors,
            sources,
            settings.n_candidates,
            progress,
            first=round(len(val.train) * (1 - RANKER_RECENT_SHARE)),
        )
        n_fit = sum(1 for p in positions if p < len(val.train))
        fit_rows, val_rows = examples.subset(slice(0, n_fit)), examples.subset(slice(n_fit, None))
        knet, kconfig, khistory = train_ranker(
            fit_rows,
            vectors,
            validation=val_rows,
            item_stats_params=sources.item_stats.params(),
            seed=seed,
            progress=progress,
        )
        kconfig["item_encoder_version"] = config["version"]
        kconfig["user_updater_version"] = rconfig["version"]
        kconfig["recent_share"] = RANKER_RECENT_SHARE
        kconfig["candidate_pools"] = {
            "n_trending": sources.n_trending,
            "n_new": sources.n_new,
            "n_rising": sources.n_rising,
            "n_co": sources.n_co,
        }
        save_ranker(models_dir / RANKER, knet, kconfig)
        histories["ranker (two-tower)"] = khistory
        record["stages"]["ranker"] = {
            "version": kconfig["version"],
            "seconds": time.perf_counter() - began,
            "examples": len(fit_rows),
            "validation_examples": len(val_rows),
            "validation": kconfig["training"]["validation"],
        }
        log.info("ranker %s in %.0f s", kconfig["version"], time.perf_counter() - began)
    else:
        kconfig = stage_config(models_dir, "ranker", RANKER_KIND, config["version"])

    began = time.perf_counter()
    fit = fit_rating_factors(ratings_of(val.train), seed=seed, progress=progress)
    rating_model = save_rating_model(
        models_dir / RATING_MODEL,
        fit,
        RatingParams(),
        {"item_encoder_version": config["version"]},
    )
    vectors_of = {m: vectors[i] / np.linalg.norm(vectors[i]) for i, m in enumerate(ids)}
    rmse = prequential_rmse(rating_model, val.train, val.test, vectors_of, ItemStats())
    record["stages"]["rating_model"] = {
        "version": rating_model.model_version,
        "seconds": time.perf_counter() - began,
        "validation_rmse": rmse,
        "ranker_head_validation_rmse": kconfig["training"]["validation"].get("val_rmse"),
    }
    log.info(
        "rating model %s in %.0f s: validation RMSE %.4f",
        rating_model.model_version,
        time.perf_counter() - began,
        rmse,
    )

    reports.mkdir(parents=True, exist_ok=True)
    previous = reports / "train.json"
    if first > 0 and previous.is_file():
        # Stages loaded from checkpoints keep their record and curves from the last run.
        old = json.loads(previous.read_text())
        record["stages"] = {**old.get("stages", {}), **record["stages"]}
        histories = {**old.get("histories", {}), **histories}
    if histories:
        plot_losses(histories, reports / "train-losses.png")
    record["trajectory_user"] = plot_embedding(
        dataset, ids, vectors, updater, split.train, reports / "embedding-space.png"
    )
    record["histories"] = histories
    return record


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    log_above_progress_bars()
    parser = argparse.ArgumentParser(
        prog="python -m infra.lab.train", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--dataset", type=Path, default=Path("data/ml-100k"))
    parser.add_argument("--models-dir", type=Path, help="default: REELSTREAM_MODELS_DIR (models/)")
    parser.add_argument("--reports", type=Path, default=Path("reports"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument(
        "--stage",
        choices=STAGES,
        default=STAGES[0],
        help="first stage to train; earlier ones are loaded from their checkpoints (default: all)",
    )
    args = parser.parse_args(argv)
    started = time.perf_counter()
    settings = Settings()
    models_dir = args.models_dir or settings.models_dir
    dataset = load_movielens(args.dataset)
    split = temporal_split(dataset.ratings)
    record = train_all(
        settings,
        dataset,
        split,
        models_dir,
        args.reports,
        seed=args.seed,
        progress=not args.quiet,
        start=args.stage,
    )
    record.update(
        {
            "command": "python -m infra.lab.train " + " ".join(sys.argv[1:]),
            "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "wall_s": time.perf_counter() - started,
            "models_dir": str(models_dir),
            "train_ratings": len(split.train),
        }
    )
    write_json(args.reports / "train.json", record)
    print(
        f"trained in {record['wall_s']:.0f} s: "
        + ", ".join(
            f"{k} {v['version']} ({v['seconds']:.0f} s)" for k, v in record["stages"].items()
        )
        + f"; checkpoints in {models_dir}/"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
