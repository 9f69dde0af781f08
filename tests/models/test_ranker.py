"""The two-tower ranker on small synthetic data: it learns, it is seeded, logQ matters,
batch == single, and checkpoints round-trip and refuse what does not fit."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from shared.exceptions import ConfigurationError, NumericalError
from shared.models.item_stats import N_ITEM_FEATURES, N_USER_FEATURES
from shared.models.ranker import (
    ExampleBuilder,
    Ranker,
    RankerConfig,
    RankerExamples,
    TwoTowerNet,
    load_ranker,
    save_ranker,
    train_ranker,
)

DIM = 16
N_ITEMS = 40  # items 0..19 are group A (near axis 0), 20..39 group B (near axis 1)
SMALL = RankerConfig(
    embed_dim=16, hidden=32, rating_hidden=16, epochs=6, batch_size=64, lr=3e-3, dropout=0.0
)


def unit(m: np.ndarray) -> np.ndarray:
    return (m / np.linalg.norm(m, axis=-1, keepdims=True)).astype(np.float32)


def make_items(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    items = 0.3 * rng.normal(size=(N_ITEMS, DIM))
    items[:20, 0] += 1.0
    items[20:, 1] += 1.0
    return unit(items)


ITEMS = make_items()
ITEM_BIAS = np.linspace(-1.0, 1.0, N_ITEMS)[np.random.default_rng(9).permutation(N_ITEMS)]
"""Each item's true rating offset in stars (seen by the model as the mean_offset feature)."""


def popularity() -> np.ndarray:
    """Zipf-like: within each group, item k has weight 1/(k+1)."""
    weights = np.concatenate([1.0 / np.arange(1, 21), 1.0 / np.arange(1, 21)])
    return weights / weights.sum()


def make_examples(n: int, seed: int) -> RankerExamples:
    """Users near axis 0 rate group-B items and users near axis 1 group-A items: the
    opposite of what cosine similarity says, so only a trained ranker gets it right."""
    rng = np.random.default_rng(seed)
    builder = ExampleBuilder()
    pop = popularity()
    for _ in range(n):
        side = int(rng.integers(0, 2))
        user = 0.3 * rng.normal(size=DIM)
        user[side] += 1.0
        group = np.arange(20, 40) if side == 0 else np.arange(20)
        weights = pop[group] / pop[group].sum()
        item = int(rng.choice(group, p=weights))
        user_bias = float(rng.normal(0.0, 0.4))
        rating = float(np.clip(3.5 + ITEM_BIAS[item] + user_bias + rng.normal(0, 0.3), 0.5, 5))
        ufeats = np.array([rng.uniform(0, 1), user_bias, 0.0], dtype=np.float32)
        ifeats = np.array([math.log1p(1000 * pop[item]) / 4, 1.0, ITEM_BIAS[item], 0.0])
        builder.add(unit(user), ufeats, item, ifeats.astype(np.float32), rating)
    return builder.build()


TRAIN = make_examples(1500, seed=1)
VALID = make_examples(400, seed=2)


@pytest.fixture(scope="module")
def trained() -> tuple[TwoTowerNet, dict, dict]:
    torch.set_num_threads(1)
    return train_ranker(TRAIN, ITEMS, validation=VALID, config=SMALL, seed=0, progress=False)


def candidates(examples: RankerExamples, n_users: int) -> tuple[np.ndarray, ...]:
    """Every item as a candidate of the first ``n_users`` users, with its features."""
    feats = np.zeros((N_ITEMS, N_ITEM_FEATURES), dtype=np.float32)
    feats[:, 0] = np.log1p(1000 * popularity()) / 4
    feats[:, 1] = 1.0
    feats[:, 2] = ITEM_BIAS
    users = examples.user_vectors[:n_users]
    ufeats = examples.user_features[:n_users]
    cands = np.broadcast_to(ITEMS, (n_users, N_ITEMS, DIM)).copy()
    cfeats = np.broadcast_to(feats, (n_users, N_ITEMS, N_ITEM_FEATURES)).copy()
    return users, ufeats, cands, cfeats


def test_training_reduces_loss(trained: tuple[TwoTowerNet, dict, dict]) -> None:
    _, config, history = trained
    assert history["train_loss"][-1] < 0.8 * history["train_loss"][0]
    assert min(history["val_loss"]) < history["val_loss"][0]
    assert config["kind"] == "two-tower-ranker"
    assert config["version"].startswith("two-tower-v1-")
    assert config["training"]["best_epoch"] == int(np.argmin(history["val_loss"]))
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
    ranker = Ranker(trained[0])
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


def test_logq_correction_raises_popular_items() -> None:
    """Without correction, popular items are over-represented as in-batch negatives and
    end up scored down; the correction (Yi et al. 2019) undoes that."""
    config = replace(SMALL, cosine_skip=False, rating_weight=0.0, epochs=4)
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
        scores = Ranker(net).score_batch(users, ufeats, cands, cfeats)
        popular = np.r_[0:3, 20:23]
        rare = np.r_[15:20, 35:40]
        gaps[corrected] = float(scores[:, popular].mean() - scores[:, rare].mean())
    assert gaps[True] > gaps[False] + 1.0


def test_rating_head_beats_global_mean(trained: tuple[TwoTowerNet, dict, dict]) -> None:
    ranker = Ranker(trained[0])
    users, ufeats = VALID.user_vectors, VALID.user_features
    cands = ITEMS[VALID.item_rows][:, None, :]
    cfeats = VALID.item_features[:, None, :]
    predicted = ranker.predict_rating_batch(users, ufeats, cands, cfeats)[:, 0]
    assert ((predicted >= 0.5) & (predicted <= 5.0)).all()
    model_mse = float(np.mean((predicted - VALID.ratings) ** 2))
    mean_mse = float(np.mean((TRAIN.ratings.mean() - VALID.ratings) ** 2))
    assert model_mse < 0.5 * mean_mse


def test_batch_equals_single(trained: tuple[TwoTowerNet, dict, dict]) -> None:
    ranker = Ranker(trained[0])
    users, ufeats, cands, cfeats = candidates(VALID, 7)
    scores, ratings = ranker.score_and_rate_batch(users, ufeats, cands, cfeats)
    assert scores.shape == ratings.shape == (7, N_ITEMS)
    for row in range(7):
        single = ranker.score(users[row], ufeats[row], cands[row], cfeats[row])
        np.testing.assert_allclose(single, scores[row], rtol=1e-5, atol=1e-5)
        stars = ranker.predict_rating(users[row], ufeats[row], cands[row], cfeats[row])
        np.testing.assert_allclose(stars, ratings[row], rtol=1e-5, atol=1e-5)
    # Fewer candidates gives the same scores for those candidates.
    np.testing.assert_allclose(
        ranker.score(users[0], ufeats[0], cands[0, :5], cfeats[0, :5]),
        scores[0, :5],
        rtol=1e-5,
        atol=1e-5,
    )
    assert ranker.score(users[0], ufeats[0], cands[0, :0], cfeats[0, :0]).shape == (0,)


def test_bad_inputs_are_refused(trained: tuple[TwoTowerNet, dict, dict]) -> None:
    ranker = Ranker(trained[0])
    users, ufeats, cands, cfeats = candidates(VALID, 2)
    with pytest.raises(ValueError):
        ranker.score(users[0][:-1], ufeats[0], cands[0], cfeats[0])
    with pytest.raises(ValueError):
        ranker.score(users[0], ufeats[0], cands[0], cfeats[0, :3])
    bad = cands.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(NumericalError):
        ranker.score_batch(users, ufeats, bad, cfeats)


def test_save_load_roundtrip(trained: tuple[TwoTowerNet, dict, dict], tmp_path: Path) -> None:
    net, config, _ = trained
    config = {**config, "item_stats": {"half_life": 2000.0, "prior_strength": 5.0}}
    save_ranker(tmp_path / "ranker", net, config)
    loaded = load_ranker(tmp_path / "ranker", expected_dim=DIM)
    assert loaded.model_version == config["version"] == Ranker(net).model_version
    assert loaded.dim == DIM
    assert loaded.new_item_stats().params() == {"half_life": 2000.0, "prior_strength": 5.0}
    users, ufeats, cands, cfeats = candidates(VALID, 5)
    original = Ranker(net).score_and_rate_batch(users, ufeats, cands, cfeats)
    again = loaded.score_and_rate_batch(users, ufeats, cands, cfeats)
    np.testing.assert_array_equal(original[0], again[0])
    np.testing.assert_array_equal(original[1], again[1])


def test_load_refuses_what_does_not_fit(
    trained: tuple[TwoTowerNet, dict, dict], tmp_path: Path
) -> None:
    net, config, _ = trained
    directory = save_ranker(tmp_path / "ranker", net, config)
    with pytest.raises(ConfigurationError, match="16-d"):
        load_ranker(directory, expected_dim=DIM + 1)
    with pytest.raises(ConfigurationError):
        load_ranker(tmp_path / "missing")
    path = directory / "config.json"
    stored = json.loads(path.read_text())
    path.write_text(json.dumps({**stored, "item_feature_names": ["popularity"]}))
    with pytest.raises(ConfigurationError, match="features"):
        load_ranker(directory)
    path.write_text(json.dumps({**stored, "hidden": 8}))
    with pytest.raises(ConfigurationError, match="does not fit"):
        load_ranker(directory)


def test_example_builder_checks_rows() -> None:
    builder = ExampleBuilder()
    with pytest.raises(ValueError):
        builder.build()
    ufeats = np.zeros(N_USER_FEATURES, dtype=np.float32)
    ifeats = np.zeros(N_ITEM_FEATURES, dtype=np.float32)
    builder.add(ITEMS[0], ufeats, 3, ifeats, 4.0)
    with pytest.raises(ValueError):
        builder.add(ITEMS[0][:-1], ufeats, 3, ifeats, 4.0)
    with pytest.raises(ValueError):
        builder.add(ITEMS[0], ufeats[:-1], 3, ifeats, 4.0)
    with pytest.raises(ValueError):
        builder.add(ITEMS[0], ufeats, -1, ifeats, 4.0)
    with pytest.raises(NumericalError):
        builder.add(ITEMS[0], ufeats, 3, ifeats, math.nan)
    examples = builder.build()
    assert len(examples) == 1
    assert examples.dim == DIM
    assert examples.item_rows.tolist() == [3]
    assert len(TRAIN.subset(slice(0, 10))) == 10


def test_training_refuses_rows_beyond_the_items() -> None:
    with pytest.raises(ValueError):
        train_ranker(TRAIN, ITEMS[:10], config=SMALL, progress=False)
    with pytest.raises(ValueError):
        train_ranker(TRAIN, ITEMS[:, :8], config=SMALL, progress=False)
