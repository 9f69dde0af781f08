"""Early stopping on a validation score, as the trainers here use it."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


class BestEpoch:
    """Keeps the weights of the epoch with the best validation score and says when
    ``patience`` epochs in a row have not improved on it (early stopping).

    Args:
        patience: epochs without improvement tolerated before ``should_stop``.
        maximise: True when a higher score is better (NDCG), False for a loss.
    """

    def __init__(self, patience: int, *, maximise: bool) -> None:
        self.patience = patience
        self.maximise = maximise
        self.best_epoch = -1
        self.best = -math.inf if maximise else math.inf
        self.stale = 0
        self._state: dict[str, torch.Tensor] | None = None

    def update(self, net: nn.Module, epoch: int, score: float) -> bool:
        """Record ``epoch``'s validation ``score``; keep a copy of the weights if best.
        Returns whether it was the best so far."""
        better = score > self.best if self.maximise else score < self.best
        if better:
            self.best, self.best_epoch, self.stale = score, epoch, 0
            self._state = copy.deepcopy(net.state_dict())
        else:
            self.stale += 1
        return better

    def should_stop(self) -> bool:
        """True once more than ``patience`` epochs in a row did not improve."""
        return self.stale > self.patience

    def restore(self, net: nn.Module, epochs_run: int) -> int:
        """Load the best weights into ``net`` and return their epoch; without any
        validation (nothing recorded) the last epoch, ``epochs_run - 1``, is kept."""
        if self._state is None:
            return epochs_run - 1
        net.load_state_dict(self._state)
        return self.best_epoch
