"""Training of the residual user updater: loss, reproducibility, beating the
rating-weighted mean on sequential data, and the checkpoint it writes."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch

from infra.lab.training.residual import (
    ResidualConfig,
    ResidualNet,
    save_residual,
    train_residual,
    updater_of,
)
from shared.events import RatingSubmitted
from shared.exceptions import NumericalError
from shared.models.residual import KIND, load_residual_updater
from shared.models.updater import RatingWeightedMean, UserState, UserUpdater
from shared.types import Matrix, MovieId
from tests.models.residual_data import DIM, T0, history, unit_rows

SMALL = ResidualConfig(hidden=32, layers=2, lanes=16, chunk=8, epochs=6, lr=5e-3)
"""A net and training small enough for a unit test."""


@pytest.fixture(scope="module", autouse=True)
def one_thread(one_torch_thread: None) -> None:
    """The nets here are tiny (see ``one_torch_thread``)."""


# --- synthetic sequential data ------------------------------------------------------------


def sequential_data(
    n_users: int, seed: int, n_clusters: int = 8, per_cluster: int = 10
) -> tuple[list[MovieId], Matrix, list[RatingSubmitted]]:
    """Items in clusters; each user walks the clusters in a fixed cycle, rating a few
    items of one cluster before moving on to the next, so the next item follows the
    recent ones rather than the whole history."""
    rng = np.random.default_rng(seed)
    centres = unit_rows(n_clusters, seed=99)
    items = centres.repeat(per_cluster, axis=0) + 0.35 * rng.normal(
        size=(n_clusters * per_cluster, DIM)
    ).astype(np.float32)
    items /= np.linalg.norm(items, axis=1, keepdims=True)
    ids = [f"m{i}" for i in range(len(items))]
    ratings: list[RatingSubmitted] = []
    for u in range(n_users):
        cluster = int(rng.integers(n_clusters))
        when = T0 + timedelta(minutes=int(rng.integers(0, 10_000)))
        seen: set[int] = set()
        for _ in range(int(rng.integers(12, 30))):
            if rng.random() < 0.3:
                cluster = (cluster + 1) % n_clusters
            choices = [cluster * per_cluster + j for j in range(per_cluster)]
            free = [c for c in choices if c not in seen] or choices
            item = int(rng.choice(free))
            seen.add(item)
            when += timedelta(minutes=int(rng.integers(1, 600)))
            ratings.append(
                RatingSubmitted(
                    user_id=f"u{seed}-{u}",
                    movie_id=ids[item],
                    rating=float(rng.integers(3, 6)),
                    occurred_at=when,
                )
            )
    ratings.sort(key=lambda r: r.occurred_at)
    return ids, items, ratings


def mean_rank(
    updater: UserUpdater, ids: list[MovieId], items: Matrix, ratings: list[RatingSubmitted]
) -> float:
    """Mean 0-based rank of each next item among the unrated ones (lower is better)."""
    rows = {m: i for i, m in enumerate(ids)}
    states: dict[str, UserState] = {}
    rated: dict[str, set[int]] = {}
    ranks: list[int] = []
    for r in ratings:
        state = states.get(r.user_id, updater.initial_state())
        done = rated.setdefault(r.user_id, set())
        vector = updater.vector(state)
        target = rows[r.movie_id]
        if vector is not None and target not in done:
            scores = items @ vector
            free = np.array([i not in done for i in range(len(ids))])
            ranks.append(int(((scores > scores[target]) & free).sum()))
        states[r.user_id] = updater.learn_one(state, items[target], r.rating, r.occurred_at)
        done.add(target)
    return float(np.mean(ranks))


@pytest.fixture(scope="module")
def trained() -> Iterator[tuple[ResidualNet, dict, dict]]:
    ids, items, train = sequential_data(80, seed=1)
    _, _, validation = sequential_data(20, seed=2)
    yield train_residual(ids, items, train, validation=validation, config=SMALL, progress=False)


# --- training -----------------------------------------------------------------------------


def test_training_lowers_the_next_item_loss(trained: tuple[ResidualNet, dict, dict]) -> None:
    net, config, history = trained
    # Training moved the net away from the identity it starts as.
    assert float(net.out.weight.detach().abs().sum()) > 0
    assert history["train_loss"][-1] < history["train_loss"][0]
    assert min(history["val_loss"]) < history["val_loss"][0] or history["val_ndcg"][0] > 0
    assert len(history["val_ndcg"]) == len(history["train_loss"])
    assert config["kind"] == KIND and config["version"].startswith("residual-v1-")
    assert config["dim"] == DIM
    assert config["training"]["n_train_steps"] > 0


def test_training_is_reproducible() -> None:
    ids, items, train = sequential_data(20, seed=3)
    quick = replace(SMALL, epochs=2)
    a, config_a, _ = train_residual(ids, items, train, config=quick, seed=5, progress=False)
    b, config_b, _ = train_residual(ids, items, train, config=quick, seed=5, progress=False)
    c, config_c, _ = train_residual(ids, items, train, config=quick, seed=6, progress=False)
    for name, tensor in a.state_dict().items():
        torch.testing.assert_close(tensor, b.state_dict()[name], rtol=0, atol=0)
    assert config_a["version"] == config_b["version"] != config_c["version"]
    assert not torch.equal(a.out.weight, c.out.weight)


def test_trained_updater_ranks_the_next_item_better_than_the_mean(
    trained: tuple[ResidualNet, dict, dict],
) -> None:
    ids, items, _ = sequential_data(80, seed=1)
    _, _, fresh_users = sequential_data(30, seed=4)
    residual = mean_rank(updater_of(trained[0]), ids, items, fresh_users)
    mean = mean_rank(RatingWeightedMean(), ids, items, fresh_users)
    assert residual < 0.8 * mean, f"residual {residual:.2f} vs mean {mean:.2f}"


def test_training_refuses_items_that_do_not_match() -> None:
    ids, items, train = sequential_data(3, seed=5)
    with pytest.raises(ValueError, match="one row per item"):
        train_residual(ids[:-1], items, train, config=SMALL, progress=False)
    with pytest.raises(ValueError, match="no training rating"):
        train_residual(["other"], items[:1], train, config=SMALL, progress=False)
    bad = items.copy()
    bad[0, 0] = np.nan
    with pytest.raises(NumericalError):
        train_residual(ids, bad, train, config=SMALL, progress=False)


# --- checkpoints --------------------------------------------------------------------------


def test_checkpoint_roundtrip(trained: tuple[ResidualNet, dict, dict], tmp_path: Path) -> None:
    net, config, _ = trained
    save_residual(tmp_path / "ck", net, config)
    loaded = load_residual_updater(tmp_path / "ck", expected_dim=DIM)
    direct = updater_of(net)
    assert loaded.model_version == direct.model_version == config["version"]
    a, b = history(loaded, 6, seed=22), history(direct, 6, seed=22)
    assert a.vector is not None and b.vector is not None
    np.testing.assert_array_equal(a.vector, b.vector)
