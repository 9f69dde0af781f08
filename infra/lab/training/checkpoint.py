"""Writing versioned model checkpoints: the folder ``shared.models.checkpoint`` reads.

``save_checkpoint`` writes ``weights.safetensors`` (a module's tensors, detached, on
CPU, or named numpy arrays) and ``config.json`` (the caller's config plus the folder
layout's ``format``); each model's trainer wraps it with its own ``save_*`` that fills
in what its loader checks.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import save_file

from shared.models.checkpoint import CONFIG_FILE, FORMAT, WEIGHTS_FILE

log = logging.getLogger(__name__)


def save_checkpoint(
    directory: Path, weights: torch.nn.Module | Mapping[str, np.ndarray], config: dict[str, Any]
) -> Path:
    """Write the weights (a module's ``state_dict``, or named numpy arrays) and
    ``config`` (which must name ``kind`` and ``version``) into ``directory``; returns the
    directory.

    Raises:
        ValueError: ``config`` lacks ``kind`` or ``version``, or is not JSON-serialisable.
    """
    for key in ("kind", "version"):
        if not isinstance(config.get(key), str) or not config[key]:
            raise ValueError(f"checkpoint config needs a non-empty string {key!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = numpy_state(weights) if isinstance(weights, torch.nn.Module) else dict(weights)
    save_file(
        {name: np.asarray(array, order="C") for name, array in state.items()},
        directory / WEIGHTS_FILE,
    )
    (directory / CONFIG_FILE).write_text(
        json.dumps({**config, "format": FORMAT}, indent=2, sort_keys=True) + "\n"
    )
    log.info(
        "saved checkpoint kind=%s version=%s dir=%s", config["kind"], config["version"], directory
    )
    return directory


def numpy_state(module: torch.nn.Module) -> dict[str, np.ndarray]:
    """A module's ``state_dict`` as numpy arrays (copies, on CPU): what the services'
    numpy models take, as they would read it from the module's checkpoint."""
    return {
        name: tensor.detach().cpu().numpy().copy() for name, tensor in module.state_dict().items()
    }
