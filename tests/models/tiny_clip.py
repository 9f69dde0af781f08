"""A tiny, randomly initialised open_clip model written to disk like real CLIP weights.

No real CLIP weights exist on the test machines; this model goes through exactly the
same loading path (``load_image_encoder`` with ``CLIP_WEIGHTS``, ``CLIP_MODEL`` and
``CLIP_MODEL_CONFIG``), only smaller.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import open_clip
import torch

from shared.config import Settings

TINY_CLIP_NAME = "reelstream-tiny-clip"
TINY_CLIP_CONFIG: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 1000, "width": 32, "heads": 2, "layers": 1},
}


def write_tiny_clip(
    directory: Path,
    *,
    name: str = TINY_CLIP_NAME,
    config: dict[str, Any] | None = None,
    seed: int = 0,
) -> tuple[Path, Path]:
    """Write ``<name>.json`` and a seeded random state_dict; returns (config, weights)."""
    config = config or TINY_CLIP_CONFIG
    directory.mkdir(parents=True, exist_ok=True)
    config_path = directory / f"{name}.json"
    config_path.write_text(json.dumps(config))
    torch.manual_seed(seed)
    model = open_clip.CLIP(**config)
    weights_path = directory / f"{name}-seed{seed}.pt"
    torch.save(model.state_dict(), weights_path)
    return config_path, weights_path


def tiny_clip_settings(directory: Path, **overrides: Any) -> Settings:
    """Settings with the image modality on, using a tiny CLIP written to ``directory``."""
    config_path, weights_path = write_tiny_clip(directory)
    values: dict[str, Any] = {
        "clip_weights": weights_path,
        "clip_model": TINY_CLIP_NAME,
        "clip_model_config": config_path,
        "device": "cpu",
    }
    values.update(overrides)
    return Settings(**values)
