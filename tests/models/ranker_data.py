"""Synthetic two-tower ranker data for the ranker's tests (``tests/models`` and
``tests/lab/training``): users near one axis rate items near the other, against what
cosine similarity says."""

from __future__ import annotations

import numpy as np

from infra.lab.training.ranker import ExampleBuilder, RankerConfig, RankerExamples
from shared.models.item_stats import N_CANDIDATE_FEATURES

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


def candidates(examples: RankerExamples, n_users: int) -> tuple[np.ndarray, ...]:
    """Every item as a candidate of the first ``n_users`` users, with its features."""
    users = examples.user_vectors[:n_users]
    ufeats = examples.user_features[:n_users]
    cands = np.broadcast_to(ITEMS, (n_users, N_ITEMS, DIM)).copy()
    cfeats = np.broadcast_to(ITEM_FEATURES, (n_users, N_ITEMS, N_CANDIDATE_FEATURES)).copy()
    return users, ufeats, cands, cfeats
