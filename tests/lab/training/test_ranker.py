"""Training of the two-tower ranker on small synthetic data: it learns, it is seeded,
logQ matters, and examples carry candidates."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from infra.lab.training.ranker import (
    ExampleBuilder,
    RankerConfig,
    RankerExamples,
    TwoTowerNet,
    ranker_of,
    train_ranker,
)
from shared.exceptions import NumericalError
from shared.models.item_stats import N_CANDIDATE_FEATURES, N_USER_FEATURES
from tests.models.ranker_data import (
    DIM,
    ITEM_BIAS,
    ITEM_FEATURES,
    ITEMS,
    N_ITEMS,
    SMALL,
    TRAIN,
    VALID,
    candidates,
    unit,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def trained() -> tuple[TwoTowerNet, dict, dict]:
    return train_ranker(TRAIN, ITEMS, validation=VALID, config=SMALL, seed=0, progress=False)


def test_the_synthetic_examples_have_padding_and_misses() -> None:
    slots = TRAIN.positive_slots()
    assert 0.05 < (slots == -1).mean() < 0.2
    assert (TRAIN.candidate_rows == -1).any()
    assert TRAIN.candidate_rows.shape == (len(TRAIN), N_ITEMS)
    assert TRAIN.candidate_features.dtype == np.float16
    hit = slots >= 0
    np.testing.assert_array_equal(TRAIN.candidate_rows[hit, slots[hit]], TRAIN.item_rows[hit])


def test_training_reduces_loss_and_keeps_the_best_ndcg(
    trained: tuple[TwoTowerNet, dict, dict],
) -> None:
    _, config, history = trained
    assert set(history) == {
        "train_loss",
        "train_candidate",
        "train_in_batch",
        "train_rmse",
        "val_ndcg",
        "val_hr",
        "val_cosine_ndcg",
        "val_cosine_hr",
        "val_loss",
        "val_rmse",
    }
    assert all(len(values) == SMALL.epochs for values in history.values())
    assert history["train_loss"][-1] < 0.8 * history["train_loss"][0]
    assert history["train_candidate"][-1] < history["train_candidate"][0]
    assert history["train_rmse"][-1] < history["train_rmse"][0]
    assert min(history["val_loss"]) < history["val_loss"][0]
    assert config["kind"] == "two-tower-ranker"
    assert config["version"].startswith("two-tower-v4-")
    training = config["training"]
    best = int(np.argmax(history["val_ndcg"]))
    assert training["best_epoch"] == best
    assert training["validation"] == {
        key: values[best] for key, values in history.items() if key.startswith("val_")
    }
    assert (training["n_examples"], training["n_validation"]) == (len(TRAIN), len(VALID))
    json.dumps(config)  # the checkpoint config must be JSON


def test_training_is_reproducible(trained: tuple[TwoTowerNet, dict, dict]) -> None:
    net, config, _ = trained
    again, again_config, _ = train_ranker(
        TRAIN, ITEMS, validation=VALID, config=SMALL, seed=0, progress=False
    )
    for name, tensor in net.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name]), name
    assert again_config["version"] == config["version"]
    _, other_config, _ = train_ranker(
        TRAIN, ITEMS, config=replace(SMALL, epochs=1), seed=1, progress=False
    )
    assert other_config["version"] != config["version"]


def test_learns_preference_that_cosine_gets_wrong(
    trained: tuple[TwoTowerNet, dict, dict],
) -> None:
    _, config, history = trained
    # Among each row's own candidates, cosine order puts the rated item low; the ranker high.
    validation = config["training"]["validation"]
    assert validation["val_ndcg"] > validation["val_cosine_ndcg"] + 0.2
    assert validation["val_hr"] > validation["val_cosine_hr"]
    # Cosine's numbers do not depend on training.
    assert len(set(history["val_cosine_ndcg"])) == 1

    ranker = ranker_of(trained[0])
    users, ufeats, cands, cfeats = candidates(VALID, 200)
    scores = ranker.score_batch(users, ufeats, cands, cfeats)
    side_a = users[:, 0] > users[:, 1]  # these users rate group B
    gap = scores[:, 20:].mean(axis=1) - scores[:, :20].mean(axis=1)
    cosine = np.einsum("ncd,nd->nc", cands, users)
    cosine_gap = cosine[:, 20:].mean(axis=1) - cosine[:, :20].mean(axis=1)
    # Cosine prefers the user's own side; the ranker learnt the opposite.
    assert (cosine_gap[side_a] < 0).all()
    assert (gap[side_a] > 0).mean() > 0.95
    assert (gap[~side_a] < 0).mean() > 0.95


def test_learns_to_use_the_pair_feature() -> None:
    """Vectors and item features say nothing here; only the last (pair) column, the
    user's CF score of each candidate, is higher for the rated item. The ranker must
    learn it from the candidate softmax alone (the in-batch term sees it zeroed)."""
    rng = np.random.default_rng(4)

    def examples(n: int) -> RankerExamples:
        builder = ExampleBuilder()
        for _ in range(n):
            cands = rng.permutation(N_ITEMS)[:30]
            item = int(cands[0])
            cands = rng.permutation(cands)
            feats = np.zeros((30, N_CANDIDATE_FEATURES), dtype=np.float32)
            feats[:, -1] = rng.normal(size=30)
            feats[cands == item, -1] += 2.0
            builder.add(
                unit(rng.normal(size=DIM)),
                np.zeros(4, dtype=np.float32),
                item,
                feats[cands == item][0],
                3.5,
                cands,
                feats,
            )
        return builder.build()

    _, config, _ = train_ranker(
        examples(1000), ITEMS, validation=examples(300), config=SMALL, seed=0, progress=False
    )
    validation = config["training"]["validation"]
    assert validation["val_ndcg"] > validation["val_cosine_ndcg"] + 0.2


def test_logq_correction_raises_popular_items() -> None:
    """Without correction, popular items are over-represented as in-batch negatives and
    end up scored down; the correction (Yi et al. 2019) undoes that. Only the in-batch
    softmax acts here (no candidate softmax, no rating loss)."""
    config = replace(SMALL, candidate_weight=0.0, in_batch_weight=1.0, rating_weight=0.0, epochs=4)
    gaps = {}
    for corrected in (True, False):
        net, _, _ = train_ranker(
            TRAIN,
            ITEMS,
            config=replace(config, logq_correction=corrected),
            seed=0,
            progress=False,
        )
        users, ufeats, cands, cfeats = candidates(VALID, 200)
        scores = ranker_of(net).score_batch(users, ufeats, cands, cfeats)
        popular = np.r_[0:3, 20:23]
        rare = np.r_[15:20, 35:40]
        gaps[corrected] = float(scores[:, popular].mean() - scores[:, rare].mean())
    assert gaps[True] > gaps[False] + 1.0


def test_rating_head_learns_the_item_bias(trained: tuple[TwoTowerNet, dict, dict]) -> None:
    ranker = ranker_of(trained[0])
    users, ufeats = VALID.user_vectors, VALID.user_features
    cands = ITEMS[VALID.item_rows][:, None, :]
    cfeats = VALID.item_features[:, None, :]
    predicted = ranker.predict_rating_batch(users, ufeats, cands, cfeats)[:, 0]
    assert ((predicted >= 0.5) & (predicted <= 5.0)).all()
    model_mse = float(np.mean((predicted - VALID.ratings) ** 2))
    mean_mse = float(np.mean((TRAIN.ratings.mean() - VALID.ratings) ** 2))
    assert model_mse < 0.5 * mean_mse
    # Every item for every user: the mean predicted rating of an item follows its bias.
    all_items = ranker.predict_rating_batch(*candidates(VALID, 200))
    assert np.corrcoef(all_items.mean(axis=0), ITEM_BIAS)[0, 1] > 0.9


def test_example_builder_pads_candidates_and_finds_the_positive() -> None:
    builder = ExampleBuilder()
    ufeats = np.zeros(N_USER_FEATURES, dtype=np.float32)
    rows = [[5, 3, 7], [1], [2, 4]]
    for item, cands in zip([3, 9, 4], rows, strict=True):
        builder.add(ITEMS[0], ufeats, item, ITEM_FEATURES[item], 4.0, cands, ITEM_FEATURES[cands])
    examples = builder.build()
    assert examples.candidate_rows.tolist() == [[5, 3, 7], [1, -1, -1], [2, 4, -1]]
    assert examples.candidate_rows.dtype == np.int64
    assert examples.candidate_features.shape == (3, 3, N_CANDIDATE_FEATURES)
    assert examples.candidate_features.dtype == np.float16
    np.testing.assert_array_equal(
        examples.candidate_features[0], ITEM_FEATURES[[5, 3, 7]].astype(np.float16)
    )
    assert (examples.candidate_features[1, 1:] == 0).all()
    assert (examples.candidate_features[2, 2] == 0).all()
    # Item 9 is not among row 1's candidates.
    assert examples.positive_slots().tolist() == [1, -1, 1]
    assert examples.positive_slots().dtype == np.int64
    subset = examples.subset(slice(1, 3))
    assert subset.positive_slots().tolist() == [-1, 1]
    assert subset.candidate_rows.tolist() == [[1, -1, -1], [2, 4, -1]]


def test_example_builder_checks_rows() -> None:
    builder = ExampleBuilder()
    with pytest.raises(ValueError):
        builder.build()
    ufeats = np.zeros(N_USER_FEATURES, dtype=np.float32)
    ifeats = np.zeros(N_CANDIDATE_FEATURES, dtype=np.float32)
    cands, cfeats = [3, 4], np.zeros((2, N_CANDIDATE_FEATURES), dtype=np.float32)
    builder.add(ITEMS[0], ufeats, 3, ifeats, 4.0, cands, cfeats)
    with pytest.raises(ValueError):
        builder.add(ITEMS[0][:-1], ufeats, 3, ifeats, 4.0, cands, cfeats)
    with pytest.raises(ValueError):
        builder.add(ITEMS[0], ufeats[:-1], 3, ifeats, 4.0, cands, cfeats)
    with pytest.raises(ValueError):
        builder.add(ITEMS[0], ufeats, 3, ifeats[:-1], 4.0, cands, cfeats)
    with pytest.raises(ValueError):
        builder.add(ITEMS[0], ufeats, -1, ifeats, 4.0, cands, cfeats)
    with pytest.raises(ValueError):
        builder.add(ITEMS[0], ufeats, 3, ifeats, 4.0, [3, -1], cfeats)
    with pytest.raises(ValueError):
        builder.add(ITEMS[0], ufeats, 3, ifeats, 4.0, [3, 4, 5], cfeats)
    with pytest.raises(ValueError):
        builder.add(ITEMS[0], ufeats, 3, ifeats, 4.0, cands, cfeats[:, :-1])
    with pytest.raises(NumericalError):
        builder.add(ITEMS[0], ufeats, 3, ifeats, math.nan, cands, cfeats)
    bad = cfeats.copy()
    bad[1, 2] = math.inf
    with pytest.raises(NumericalError):
        builder.add(ITEMS[0], ufeats, 3, ifeats, 4.0, cands, bad)
    examples = builder.build()
    assert len(examples) == 1
    assert examples.dim == DIM
    assert examples.item_rows.tolist() == [3]
    assert len(TRAIN.subset(slice(0, 10))) == 10


def test_examples_refuse_what_does_not_fit() -> None:
    part = TRAIN.subset(slice(0, 4))
    with pytest.raises(ValueError):
        replace(part, candidate_rows=np.full_like(part.candidate_rows, -2))
    with pytest.raises(ValueError):
        replace(part, candidate_rows=part.candidate_rows[:, :5])
    with pytest.raises(ValueError):
        replace(part, candidate_features=part.candidate_features[:3])
    bad = part.candidate_features.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(NumericalError):
        replace(part, candidate_features=bad)


def test_config_needs_a_ranking_loss() -> None:
    with pytest.raises(ValueError):
        RankerConfig(candidate_weight=0.0, in_batch_weight=0.0)
    with pytest.raises(ValueError):
        RankerConfig(batch_size=1)
    with pytest.raises(ValueError):
        RankerConfig(feature_hidden=0)
    RankerConfig(candidate_weight=0.0)  # the in-batch softmax alone is enough


def test_training_refuses_rows_beyond_the_items() -> None:
    with pytest.raises(ValueError):
        train_ranker(TRAIN, ITEMS[:10], config=SMALL, progress=False)
    with pytest.raises(ValueError):
        train_ranker(TRAIN, ITEMS[:, :8], config=SMALL, progress=False)
    # Rated items within the matrix, but a candidate beyond it.
    low = np.flatnonzero(TRAIN.item_rows < 20)[:50]
    part = TRAIN.subset(low)
    assert part.candidate_rows.max() >= 20
    with pytest.raises(ValueError):
        train_ranker(part, ITEMS[:20], config=SMALL, progress=False)
