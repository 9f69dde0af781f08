"""Writing versioned model checkpoints: the folder ``shared.models.checkpoint`` reads.

``save_checkpoint`` writes ``state_dict.pt`` (the module's tensors, detached, on CPU)
and ``config.json`` (the caller's config plus the folder layout's ``format``); each
model's trainer wraps it with its own ``save_*`` that fills in what its loader checks.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from shared.models.checkpoint import CONFIG_FILE, FORMAT, WEIGHTS_FILE

log = logging.getLogger(__name__)


def save_checkpoint(directory: Path, module: torch.nn.Module, config: dict[str, Any]) -> Path:
    """Write ``module.state_dict()`` and ``config`` (which must name ``kind`` and
    ``version``) into ``directory``; returns the directory.

    Raises:
        ValueError: ``config`` lacks ``kind`` or ``version``, or is not JSON-serialisable.
    """
    for key in ("kind", "version"):
        if not isinstance(config.get(key), str) or not config[key]:
            raise ValueError(f"checkpoint config needs a non-empty string {key!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {
        name: tensor.detach().cpu().contiguous() for name, tensor in module.state_dict().items()
    }
    torch.save(state, directory / WEIGHTS_FILE)
    (directory / CONFIG_FILE).write_text(
        json.dumps({**config, "format": FORMAT}, indent=2, sort_keys=True) + "\n"
    )
    log.info(
        "saved checkpoint kind=%s version=%s dir=%s", config["kind"], config["version"], directory
    )
    return directory
