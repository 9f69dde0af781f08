"""Versioned model checkpoints: a folder with ``state_dict.pt`` and ``config.json``.

``config.json`` says what the weights are (``kind``), their ``version`` (published with
every event the model's service emits) and everything needed to rebuild the module
(dimensions, feature layout, hyper-parameters), plus how they were trained. Loading
never unpickles: ``torch.load(weights_only=True)``. A checkpoint whose kind, format or
shapes do not fit is refused with a ``ConfigurationError`` that names the file.

This module reads checkpoints; the lab writes them (``infra.lab.training.checkpoint``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shared.exceptions import ConfigurationError

log = logging.getLogger(__name__)

FORMAT = 1
"""Version of this folder layout; bumped if ``config.json``'s meaning changes."""

WEIGHTS_FILE = "state_dict.pt"
CONFIG_FILE = "config.json"


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
            f"checkpoint {directory} has format {config.get('format')!r}; this code reads {FORMAT}"
        )
    return config


def load_checkpoint(directory: Path, kind: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The state dict (loaded with ``weights_only=True``, on CPU) and config of a
    checkpoint of ``kind``.

    Raises:
        ConfigurationError: as ``read_config``, or the weights file is missing or unreadable.
    """
    config = read_config(directory, kind)
    path = Path(directory) / WEIGHTS_FILE
    if not path.is_file():
        raise ConfigurationError(f"no checkpoint weights at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a corrupt or foreign file
        raise ConfigurationError(f"unreadable checkpoint weights {path}: {exc}") from exc
    if not isinstance(state, dict):
        raise ConfigurationError(f"checkpoint weights {path} are not a state dict")
    return state, config


def load_into(module: torch.nn.Module, state: dict[str, torch.Tensor], where: Path) -> None:
    """``module.load_state_dict(state)`` (strict), a mismatch becoming a
    ``ConfigurationError`` that names the checkpoint."""
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ConfigurationError(f"checkpoint {where} does not fit its config: {exc}") from exc


def state_digest(net: nn.Module) -> str:
    """SHA-256 hex digest of a net's weights (every ``state_dict`` entry by name): two
    nets digest equal exactly when their weights are equal. Versions of trained models
    are built from it."""
    digest = hashlib.sha256()
    for name, tensor in sorted(net.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
