"""The numpy forward pass of the small trained nets the services run without torch.

The lab trains the user updater and the ranker as torch modules; their weights are a
few hundred kilobytes and each call is a few matrix products, so the user-profile and
recommender services run them here, in numpy, and never import torch (about 470 MB of
resident memory per process, and seconds of start-up). ``Mlp`` reads the stack of
``nn.Linear`` layers of a checkpoint's state dict by their names; the activation is
``nn.GELU``'s exact form, so the outputs match the torch modules' to float rounding
(the lab's tests compare both on the same weights).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from itertools import pairwise

import numpy as np
from scipy.special import erf

from shared.exceptions import ConfigurationError

_INV_SQRT2 = 1.0 / math.sqrt(2.0)


def gelu(x: np.ndarray) -> np.ndarray:
    """``x * Phi(x)``, torch's ``nn.GELU()`` (the exact form, not the tanh one)."""
    return 0.5 * x * (1.0 + erf(x * _INV_SQRT2))


class Linear:
    """``x @ W.T + b`` with an ``nn.Linear``'s weight ``(out, in)`` and bias ``(out,)``."""

    def __init__(self, weight: np.ndarray, bias: np.ndarray, dtype: type = np.float32) -> None:
        if weight.ndim != 2 or bias.shape != (weight.shape[0],):
            raise ValueError(
                f"a linear layer needs (out, in) and (out,), got {weight.shape}, {bias.shape}"
            )
        self.weight_t: np.ndarray = np.ascontiguousarray(weight.T, dtype=dtype)
        self.bias: np.ndarray = np.asarray(bias, dtype=dtype)

    @property
    def n_in(self) -> int:
        return int(self.weight_t.shape[0])

    @property
    def n_out(self) -> int:
        return int(self.weight_t.shape[1])

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return x @ self.weight_t + self.bias


class Mlp:
    """Linear layers with GELU between them (and after the last when ``activate_last``),
    as the lab's ``nn.Sequential`` of ``Linear``, ``GELU`` (and ``Dropout``, which
    inference skips).

    Args:
        layers: the linear layers in order.
        activate_last: GELU after the last layer too.
    """

    def __init__(self, layers: Sequence[Linear], *, activate_last: bool = False) -> None:
        if not layers:
            raise ValueError("an MLP needs at least one layer")
        for before, after in pairwise(layers):
            if before.n_out != after.n_in:
                raise ValueError(f"layer widths {before.n_out} and {after.n_in} do not chain")
        self.layers = list(layers)
        self.activate_last = activate_last

    @classmethod
    def from_state(
        cls,
        state: Mapping[str, np.ndarray],
        prefix: str,
        *,
        activate_last: bool = False,
        dtype: type = np.float32,
    ) -> Mlp:
        """The MLP of the ``{prefix}.{i}.weight`` / ``.bias`` entries of a state dict
        (an ``nn.Sequential``'s numbering), in the order of ``i``.

        Raises:
            ConfigurationError: no such entries, or a weight without its bias.
        """
        pattern = re.compile(rf"{re.escape(prefix)}\.(\d+)\.weight")
        indices = sorted(int(m.group(1)) for name in state if (m := pattern.fullmatch(name)))
        if not indices:
            raise ConfigurationError(f"no layers named {prefix}.N.weight in the checkpoint")
        try:
            layers = [
                Linear(state[f"{prefix}.{i}.weight"], state[f"{prefix}.{i}.bias"], dtype)
                for i in indices
            ]
            return cls(layers, activate_last=activate_last)
        except (KeyError, ValueError) as exc:
            raise ConfigurationError(f"the checkpoint's {prefix} layers do not fit: {exc}") from exc

    @property
    def n_in(self) -> int:
        return self.layers[0].n_in

    @property
    def n_out(self) -> int:
        return self.layers[-1].n_out

    def __call__(self, x: np.ndarray) -> np.ndarray:
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < last or self.activate_last:
                x = gelu(x)
        return x


def normalize(x: np.ndarray, eps: float) -> np.ndarray:
    """Rows divided by their L2 norm, at least ``eps`` (torch's ``F.normalize``)."""
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norms, eps)
