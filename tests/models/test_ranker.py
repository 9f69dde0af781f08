"""The two-tower ranker on small synthetic data: it learns, it is seeded, logQ matters,
batch == single, examples carry candidates, and checkpoints round-trip and refuse what
does not fit."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from shared.exceptions import ConfigurationError, NumericalError
from shared.models.item_stats import N_CANDIDATE_FEATURES, N_USER_FEATURES
from shared.models.online_cf import OnlineBPR
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

torch.set_num_threads(1)

DIM = 16
N_ITEMS = 40  # items 0..19 are group A (near axis 0), 20..39 group B (near axis 1)
SMALL = RankerConfig(
    embed_dim=16,
    hidden=32,
    feature_hidden=16,
    rating_hidden=16,
    epochs=6,
    patience=6,
    batch_size=64,
    lr=3e-3,
    dropout=0.0,
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


def item_feature_table() -> np.ndarray:
    """``(N_ITEMS, N_CANDIDATE_FEATURES)``: every item's features, in ``CANDIDATE_FEATURE_NAMES``
    order (the same at every event, for simplicity)."""
    pop = popularity()
    ages = np.random.default_rng(8).uniform(0.0, 30.0, N_ITEMS)
    table = np.zeros((N_ITEMS, N_CANDIDATE_FEATURES), dtype=np.float32)
    table[:, 0] = np.log1p(1000 * pop) / 4  # log_recent_share
    table[:, 1] = np.log1p(1000 * pop) / 4  # log_fast_share
    table[:, 2] = np.log1p(5000 * pop) / 4  # log_count
    table[:, 3] = ITEM_BIAS  # mean_offset
    table[:, 5] = np.log1p(ages) / 4  # log_age
    table[:, 6] = ages < 1.0  # new_release
    return table


ITEM_FEATURES = item_feature_table()


def make_examples(n: int, seed: int) -> RankerExamples:
    """Users near axis 0 rate group-B items and users near axis 1 group-A items: the
    opposite of what cosine similarity says, so only a trained ranker gets it right.

    Each row's candidates are 20 to 40 distinct items in random order (so shorter rows
    are padded); the rated item is among them in about 90% of the rows and missing (as
    when retrieval misses it) in the rest.
    """
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
        ufeats = np.array(
            [rng.uniform(0, 1), user_bias, float(rng.random() < 0.2), rng.normal(0, 0.2)],
            dtype=np.float32,
        )
        others = rng.permutation(np.delete(np.arange(N_ITEMS), item))
        cands = others[: int(rng.integers(20, 40))]
        if rng.random() < 0.9:
            cands = rng.permutation(np.append(cands, item))
        builder.add(
            unit(user), ufeats, item, ITEM_FEATURES[item], rating, cands, ITEM_FEATURES[cands]
        )
    return builder.build()


TRAIN = make_examples(1500, seed=1)
VALID = make_examples(400, seed=2)


@pytest.fixture(scope="module")
def trained() -> tuple[TwoTowerNet, dict, dict]:
    return train_ranker(TRAIN, ITEMS, validation=VALID, config=SMALL, seed=0, progress=False)


def candidates(examples: RankerExamples, n_users: int) -> tuple[np.ndarray, ...]:
    """Every item as a candidate of the first ``n_users`` users, with its features."""
    users = examples.user_vectors[:n_users]
    ufeats = examples.user_features[:n_users]
    cands = np.broadcast_to(ITEMS, (n_users, N_ITEMS, DIM)).copy()
    cfeats = np.broadcast_to(ITEM_FEATURES, (n_users, N_ITEMS, N_CANDIDATE_FEATURES)).copy()
    return users, ufeats, cands, cfeats


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
    assert config["version"].startswith("two-tower-v3-")
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
        scores = Ranker(net).score_batch(users, ufeats, cands, cfeats)
        popular = np.r_[0:3, 20:23]
        rare = np.r_[15:20, 35:40]
        gaps[corrected] = float(scores[:, popular].mean() - scores[:, rare].mean())
    assert gaps[True] > gaps[False] + 1.0


def test_rating_head_learns_the_item_bias(trained: tuple[TwoTowerNet, dict, dict]) -> None:
    ranker = Ranker(trained[0])
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


def test_score_is_the_towers_plus_weighted_cosine_and_pair_columns(
    trained: tuple[TwoTowerNet, dict, dict],
) -> None:
    net = trained[0]
    users, ufeats, cands, cfeats = candidates(VALID, 3)
    cfeats[..., -1] = np.random.default_rng(5).normal(size=cfeats.shape[:2])  # cf_score
    scores = Ranker(net).score_batch(users, ufeats, cands, cfeats)
    with torch.no_grad():
        u, f = torch.from_numpy(users), torch.from_numpy(ufeats)
        v, g = torch.from_numpy(cands), torch.from_numpy(cfeats)
        e_u = net.user_embedding(u, f)
        e_i = net.item_vector_tower(v) + net.item_feature_tower(g[..., :-1])
        assert (e_u[:, -1] == 1.0).all()  # the constant column: a per-item bias
        towers = (e_u[:, None, :] * e_i).sum(-1)
        cosine = net.cosine_weight * (v * u[:, None, :]).sum(-1)
        expected = towers + cosine + net.pair_weight[0] * g[..., -1]
    np.testing.assert_allclose(scores, expected.numpy(), rtol=1e-5, atol=1e-5)


def test_bad_inputs_are_refused(trained: tuple[TwoTowerNet, dict, dict]) -> None:
    ranker = Ranker(trained[0])
    users, ufeats, cands, cfeats = candidates(VALID, 2)
    with pytest.raises(ValueError):
        ranker.score(users[0][:-1], ufeats[0], cands[0], cfeats[0])
    with pytest.raises(ValueError):
        ranker.score(users[0], ufeats[0], cands[0], cfeats[0, :3])
    with pytest.raises(ValueError):
        ranker.score(users[0], ufeats[0][:-1], cands[0], cfeats[0])
    bad = cands.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(NumericalError):
        ranker.score_batch(users, ufeats, bad, cfeats)


def test_save_load_roundtrip(trained: tuple[TwoTowerNet, dict, dict], tmp_path: Path) -> None:
    net, config, _ = trained
    params = {"half_life": 2000.0, "prior_strength": 5.0, "fast_half_life": 300.0}
    config = {**config, "item_stats": params}
    save_ranker(tmp_path / "ranker", net, config)
    loaded = load_ranker(tmp_path / "ranker", expected_dim=DIM)
    assert loaded.model_version == config["version"] == Ranker(net).model_version
    assert loaded.dim == DIM
    assert loaded.new_item_stats().params() == params
    assert loaded.new_online_cf().params() == OnlineBPR().params()
    assert torch.equal(loaded.net.cosine_weight, net.cosine_weight)
    global_mean = float(loaded.net.state_dict()["global_mean"])
    assert global_mean == pytest.approx(float(TRAIN.ratings.mean()))
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
    load_ranker(directory)  # as written, it loads
    cases: list[tuple[dict[str, Any], str]] = [
        ({"kind": "residual-updater"}, "residual-updater"),
        ({"item_feature_names": ["popularity"]}, "features"),
        ({"user_feature_names": ["log_count", "mean_offset", "new_user"]}, "features"),
        ({"hidden": 8}, "does not fit"),
        ({"feature_hidden": 8}, "does not fit"),
        ({"n_item_features": N_CANDIDATE_FEATURES - 2}, "does not fit"),
        ({"item_stats": {"half_life": -1.0}}, "does not describe"),
        ({"online_cf": {"dim": 0}}, "does not describe"),
    ]
    for bad, match in cases:
        path.write_text(json.dumps({**stored, **bad}))
        with pytest.raises(ConfigurationError, match=match):
            load_ranker(directory)
    # A net of another dimension does not load as this one's either.
    path.write_text(json.dumps({**stored, "dim": DIM + 1}))
    with pytest.raises(ConfigurationError, match="does not fit"):
        load_ranker(directory)


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
