"""The two-tower ranker on small synthetic data: batch == single, the score is the towers
plus the weighted cosine and pair columns, bad inputs are refused, and checkpoints
round-trip and refuse what does not fit."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from infra.lab.training.ranker import TwoTowerNet, ranker_of, save_ranker, train_ranker
from shared.exceptions import ConfigurationError, NumericalError
from shared.models.item_stats import N_CANDIDATE_FEATURES
from shared.models.ranker import load_ranker
from tests.models.ranker_data import DIM, ITEMS, N_ITEMS, SMALL, TRAIN, VALID, candidates

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def trained() -> tuple[TwoTowerNet, dict, dict]:
    return train_ranker(TRAIN, ITEMS, validation=VALID, config=SMALL, seed=0, progress=False)


def test_batch_equals_single(trained: tuple[TwoTowerNet, dict, dict]) -> None:
    ranker = ranker_of(trained[0])
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
    pairs = net.n_pair_features
    assert pairs == 2
    cfeats[..., -pairs:] = np.random.default_rng(5).normal(size=(*cfeats.shape[:2], pairs))
    scores = ranker_of(net).score_batch(users, ufeats, cands, cfeats)
    with torch.no_grad():
        u, f = torch.from_numpy(users), torch.from_numpy(ufeats)
        v, g = torch.from_numpy(cands), torch.from_numpy(cfeats)
        e_u = net.user_embedding(u, f)
        e_i = net.item_vector_tower(v) + net.item_feature_tower(g[..., :-pairs])
        assert (e_u[:, -1] == 1.0).all()  # the constant column: a per-item bias
        towers = (e_u[:, None, :] * e_i).sum(-1)
        cosine = net.cosine_weight * (v * u[:, None, :]).sum(-1)
        expected = towers + cosine + g[..., -pairs:] @ net.pair_weight
    np.testing.assert_allclose(scores, expected.numpy(), rtol=1e-5, atol=1e-5)


def test_predicted_stars_are_the_torch_nets_rating_head(
    trained: tuple[TwoTowerNet, dict, dict],
) -> None:
    """The recommender runs the weights in numpy; on the same weights the lab's torch
    module gives the same stars (float32 rounding)."""
    net = trained[0]
    users, ufeats, cands, cfeats = candidates(VALID, 4)
    stars = ranker_of(net).predict_rating_batch(users, ufeats, cands, cfeats)
    with torch.no_grad():
        u, f = torch.from_numpy(users), torch.from_numpy(ufeats)
        v, g = torch.from_numpy(cands), torch.from_numpy(cfeats)
        e_u, e_i = net.user_embedding(u, f), net.item_embedding(v, g)
        cosine = (v * u[:, None, :]).sum(-1)
        expected = net.rating(e_u[:, None, :], f[:, None, :], e_i, g, cosine).clamp(0.5, 5.0)
    np.testing.assert_allclose(stars, expected.numpy(), rtol=1e-5, atol=1e-5)


def test_bad_inputs_are_refused(trained: tuple[TwoTowerNet, dict, dict]) -> None:
    ranker = ranker_of(trained[0])
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
    params = {"half_life_days": 20.0, "prior_strength": 5.0, "fast_half_life_days": 0.5}
    config = {**config, "item_stats": params}
    save_ranker(tmp_path / "ranker", net, config)
    loaded = load_ranker(tmp_path / "ranker", expected_dim=DIM)
    assert loaded.model_version == config["version"] == ranker_of(net).model_version
    assert loaded.dim == DIM
    assert loaded.new_item_stats().params() == params
    assert float(net.global_mean) == pytest.approx(float(TRAIN.ratings.mean()))
    users, ufeats, cands, cfeats = candidates(VALID, 5)
    original = ranker_of(net).score_and_rate_batch(users, ufeats, cands, cfeats)
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
        ({"item_stats": {"half_life_days": -1.0}}, "does not describe"),
        ({"item_stats": {"half_life": 5000.0}}, "does not describe"),
    ]
    for bad, match in cases:
        path.write_text(json.dumps({**stored, **bad}))
        with pytest.raises(ConfigurationError, match=match):
            load_ranker(directory)
    # A net of another dimension does not load as this one's either.
    path.write_text(json.dumps({**stored, "dim": DIM + 1}))
    with pytest.raises(ConfigurationError, match="does not fit"):
        load_ranker(directory)


def test_remembered_vector_parts_score_as_computed_ones_and_follow_a_changed_vector(
    trained: tuple[TwoTowerNet, dict, dict],
) -> None:
    ranker = ranker_of(trained[0])
    users, ufeats, cands, cfeats = candidates(VALID, 1)
    ids = [f"m{i}" for i in range(cands.shape[1])]
    direct = ranker.score_batch(users, ufeats, cands, cfeats)
    first = ranker.item_vector_parts(ids, cands[0])
    np.testing.assert_array_equal(ranker.item_vector_parts(ids, cands[0]), first)  # remembered
    np.testing.assert_allclose(
        ranker.score_batch(users, ufeats, cands, cfeats, first[None]), direct, rtol=1e-5, atol=1e-5
    )
    moved = cands.copy()
    moved[0, 3] = moved[0, 4]  # movie m3 was embedded again
    again = ranker.item_vector_parts(ids, moved[0])
    np.testing.assert_array_equal(again[3], again[4])
    np.testing.assert_allclose(
        ranker.score_batch(users, ufeats, moved, cfeats, again[None]),
        ranker.score_batch(users, ufeats, moved, cfeats),
        rtol=1e-5,
        atol=1e-5,
    )
