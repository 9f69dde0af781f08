"""Training of the fusion item encoder: the loss falls, it is seeded, each objective
does what it is for, and configs that cannot train are refused."""

from __future__ import annotations

import dataclasses
from itertools import combinations

import numpy as np
import pytest
import torch

from infra.lab.training.fusion import FusionConfig, train_fusion
from shared.exceptions import ConfigurationError
from shared.models.fusion import FusionItemEncoder, FusionNet
from shared.models.text import TextEncoder
from tests.models.fusion_data import GROUPS, MOVIES, RATINGS, SMALL, vectors


def co_rated_gap(matrix: np.ndarray) -> float:
    """Mean cosine of same-group pairs minus that of cross-group pairs."""
    sims = matrix @ matrix.T
    same = [sims[a, b] for g in GROUPS for a, b in combinations(g, 2)]
    cross = [sims[a, b] for a in GROUPS[0] for b in GROUPS[1]]
    return float(np.mean(same) - np.mean(cross))


@pytest.fixture(scope="module")
def text() -> TextEncoder:
    return TextEncoder()


@pytest.fixture(scope="module")
def trained(text: TextEncoder) -> tuple[FusionNet, dict, dict]:
    return train_fusion(MOVIES, RATINGS, text, config=SMALL, seed=0, progress=False)


def test_training_reduces_the_loss_and_logs_the_spread(
    trained: tuple[FusionNet, dict, dict],
) -> None:
    _, config, history = trained
    losses = history["train_loss"]
    assert len(losses) == SMALL.epochs
    assert losses[-1] < losses[0]
    assert history["interaction_loss"][-1] < history["interaction_loss"][0]
    assert len(history["nn_cosine"]) == len(history["mean_cosine"]) == SMALL.epochs
    assert -1.0 <= history["mean_cosine"][-1] <= history["nn_cosine"][-1] <= 1.0
    assert history["val_loss"] == []
    assert config["kind"] == "fusion-item-encoder"
    assert config["training"]["seed"] == 0
    assert config["training"]["config"]["epochs"] == SMALL.epochs


def test_training_is_reproducible_with_a_seed(
    trained: tuple[FusionNet, dict, dict], text: TextEncoder
) -> None:
    net, config, history = trained
    again, config_again, history_again = train_fusion(
        MOVIES, RATINGS, text, config=SMALL, seed=0, progress=False
    )
    assert config_again["version"] == config["version"]
    assert history_again["train_loss"] == history["train_loss"]
    for name, tensor in net.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name]), name
    _, other, _ = train_fusion(MOVIES, RATINGS, text, config=SMALL, seed=1, progress=False)
    assert other["version"] != config["version"]


INTERACTION_ONLY = FusionConfig(
    use_triplet=False, epochs=8, batch_size=32, hidden_dim=64, out_dim=32, people_buckets=512
)
"""A small encoder trained on the interaction objective alone."""


def test_the_interaction_objective_pulls_co_rated_movies_together(
    text: TextEncoder, trained: tuple[FusionNet, dict, dict]
) -> None:
    _, config, _ = trained
    net, config, _ = train_fusion(
        MOVIES, RATINGS, text, config=INTERACTION_ONLY, seed=0, progress=False
    )
    torch.manual_seed(0)
    # The same architecture and input standardisation, untrained.
    fresh = FusionNet(text_dim=text.dim, hidden_dim=64, out_dim=32, people_buckets=512)
    fresh.load_state_dict(
        {**fresh.state_dict(), "text_shift": net.text_shift, "text_scale": net.text_scale}
    )
    before = co_rated_gap(vectors(FusionItemEncoder(fresh, config, text), MOVIES))
    after = co_rated_gap(vectors(FusionItemEncoder(net, config, text), MOVIES))
    assert after > before + 0.1, (before, after)


def test_a_movie_nobody_rated_is_not_pushed_away_from_the_rated_ones(text: TextEncoder) -> None:
    """The interaction softmax draws its negatives from the rated movies only: with the
    whole catalogue as negatives, movies nobody rated end up far from every context."""
    unrated = {m.movie_id for m in MOVIES[-8:]}
    ratings = [r for r in RATINGS if r.movie_id not in unrated]

    def gap(rated_only: bool) -> float:
        config = dataclasses.replace(INTERACTION_ONLY, rated_negatives_only=rated_only)
        net, record, _ = train_fusion(MOVIES, ratings, text, config=config, progress=False)
        assert record["training"]["config"]["rated_negatives_only"] is rated_only
        matrix = vectors(FusionItemEncoder(net, record, text), MOVIES)
        is_new = np.array([m.movie_id in unrated for m in MOVIES])
        centre = matrix[~is_new].mean(axis=0)
        # How much closer the rated movies are to their centre than the unrated ones.
        return float((matrix[~is_new] @ centre).mean() - (matrix[is_new] @ centre).mean())

    assert gap(rated_only=True) < gap(rated_only=False) - 0.05


def test_validation_loss_is_recorded_when_ratings_are_held_out(text: TextEncoder) -> None:
    config = FusionConfig(
        use_triplet=False,
        epochs=2,
        batch_size=64,
        hidden_dim=32,
        out_dim=16,
        people_buckets=64,
        val_fraction=0.2,
    )
    _, record, history = train_fusion(MOVIES, RATINGS, text, config=config, progress=False)
    assert len(history["val_loss"]) == 2
    assert all(np.isfinite(history["val_loss"]))
    assert record["training"]["n_examples"] < len(RATINGS)


def test_a_config_with_no_objective_is_refused() -> None:
    with pytest.raises(ConfigurationError):
        FusionConfig(use_triplet=False, use_interaction=False)
    with pytest.raises(ConfigurationError):
        FusionConfig(temperature=0.0)
