"""Versioned model checkpoints: a folder with ``weights.safetensors`` and ``config.json``.

``config.json`` says what the weights are (``kind``), their ``version`` (published with
every event the model's service emits) and everything needed to rebuild the model
(dimensions, feature layout, hyper-parameters), plus how they were trained. The weights
are a safetensors file of named arrays: loading never unpickles, and it needs no torch,
so the services that run their models in numpy (user-profile, recommender) never import
it. A checkpoint whose kind, format or shapes do not fit is refused with a
``ConfigurationError`` that names the file.

This module reads checkpoints; the lab writes them (``infra.lab.training.checkpoint``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file

from shared.exceptions import ConfigurationError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

FORMAT = 2
"""Version of this folder layout; bumped if ``config.json``'s meaning or the weights
file changes (format 1 kept a pickled torch state dict, ``state_dict.pt``)."""

WEIGHTS_FILE = "weights.safetensors"
CONFIG_FILE = "config.json"

State = dict[str, np.ndarray]
"""A checkpoint's weights: ``state_dict`` names to arrays."""


def read_config(directory: Path, kind: str) -> dict[str, Any]:
    """The ``config.json`` of a checkpoint of ``kind``.

    Raises:
        ConfigurationError: no such folder or file, unreadable JSON, another kind, or
            another format.
    """
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise ConfigurationError(f"no checkpoint at {directory} ({CONFIG_FILE} missing)")
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigurationError(f"unreadable checkpoint config {path}: {exc}") from exc
    if not isinstance(config, dict):
        raise ConfigurationError(f"checkpoint config {path} is not a JSON object")
    if config.get("kind") != kind:
        raise ConfigurationError(
            f"checkpoint {directory} holds a {config.get('kind')!r} model, not a {kind!r} one"
        )
    if config.get("format") != FORMAT:
        raise ConfigurationError(
            f"checkpoint {directory} has format {config.get('format')!r}; this code reads "
            f"{FORMAT} (`make train` writes it)"
        )
    return config


def load_checkpoint(directory: Path, kind: str) -> tuple[State, dict[str, Any]]:
    """The weights (numpy arrays by name) and config of a checkpoint of ``kind``.

    Raises:
        ConfigurationError: as ``read_config``, or the weights file is missing or unreadable.
    """
    config = read_config(directory, kind)
    path = Path(directory) / WEIGHTS_FILE
    if not path.is_file():
        raise ConfigurationError(f"no checkpoint weights at {path}")
    try:
        state = load_file(path)
    except (OSError, SafetensorError) as exc:
        raise ConfigurationError(f"unreadable checkpoint weights {path}: {exc}") from exc
    return state, config


def check_shapes(
    state: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]], where: Path
) -> None:
    """The weights hold exactly the arrays named in ``shapes``, each of that shape and
    finite.

    Raises:
        ConfigurationError: a missing, extra, misshapen or non-finite array (named, with
            the checkpoint).
    """
    missing = sorted(set(shapes) - set(state))
    extra = sorted(set(state) - set(shapes))
    if missing or extra:
        raise ConfigurationError(
            f"checkpoint {where} does not fit its config: missing {missing}, unexpected {extra}"
        )
    for name, shape in shapes.items():
        if tuple(state[name].shape) != tuple(shape):
            raise ConfigurationError(
                f"checkpoint {where} does not fit its config: {name} has shape "
                f"{tuple(state[name].shape)}, the config asks {tuple(shape)}"
            )
        if state[name].dtype.kind == "f" and not np.isfinite(state[name]).all():
            raise ConfigurationError(f"checkpoint {where}: NaN or infinity in {name}")


def load_into(module: torch.nn.Module, state: Mapping[str, np.ndarray], where: Path) -> None:
    """``module.load_state_dict(state)`` (strict), for the models that run in torch; a
    mismatch becomes a ``ConfigurationError`` that names the checkpoint."""
    import torch

    tensors = {name: torch.from_numpy(np.array(array)) for name, array in state.items()}
    try:
        module.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise ConfigurationError(f"checkpoint {where} does not fit its config: {exc}") from exc


def state_digest(state: Mapping[str, np.ndarray]) -> str:
    """SHA-256 hex digest of weights (every array by name): two states digest equal
    exactly when their weights are equal. Versions of trained models are built from it."""
    digest = hashlib.sha256()
    for name, array in sorted(state.items()):
        digest.update(name.encode())
        digest.update(np.asarray(array, order="C").tobytes())
    return digest.hexdigest()
