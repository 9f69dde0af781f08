"""Small random item vectors and nets for the residual updater's tests (``tests/models``
and ``tests/lab/training``)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import torch

from infra.lab.training.residual import ResidualNet
from shared.models.updater import UserState, UserUpdater
from shared.types import Matrix

DIM = 16
T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def unit_rows(n: int, seed: int, dim: int = DIM) -> Matrix:
    rng = np.random.default_rng(seed)
    m = rng.normal(size=(n, dim)).astype(np.float32)
    return m / np.linalg.norm(m, axis=1, keepdims=True)


def random_net(seed: int = 0, dim: int = DIM) -> ResidualNet:
    """An untrained net whose output layer is not zero (so it is not the identity)."""
    torch.manual_seed(seed)
    net = ResidualNet(dim, hidden=32)
    with torch.no_grad():
        torch.nn.init.normal_(net.out.weight, std=0.2)
        torch.nn.init.normal_(net.out.bias, std=0.2)
    return net


def history(updater: UserUpdater, n: int, seed: int) -> UserState:
    rng = np.random.default_rng(seed)
    state = updater.initial_state()
    for i, item in enumerate(unit_rows(n, seed + 1)):
        rating = float(rng.integers(1, 11)) / 2
        state = updater.learn_one(state, item, rating, T0 + timedelta(hours=3 * i))
    return state
