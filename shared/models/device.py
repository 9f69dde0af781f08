"""Where models run: CPU by default, a CUDA device when present and asked for."""

from __future__ import annotations

import torch

from shared.exceptions import ConfigurationError


def resolve_device(name: str) -> torch.device:
    """The torch device named by ``Settings.device``.

    ``"auto"`` is CUDA when a GPU is visible, else CPU; any other name (``"cpu"``,
    ``"cuda"``, ``"cuda:1"``) is taken as is.

    Raises:
        ConfigurationError: the name is not a torch device, or CUDA was asked for and
            there is none.
    """
    wanted = name.strip().lower()
    if wanted == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(wanted)
    except (RuntimeError, ValueError) as exc:
        raise ConfigurationError(
            f"REELSTREAM_DEVICE={name!r} is not a device (use auto, cpu or cuda[:N])"
        ) from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigurationError(f"REELSTREAM_DEVICE={name!r} but no CUDA device is visible")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigurationError(
                f"REELSTREAM_DEVICE={name!r} but only {torch.cuda.device_count()} CUDA devices"
            )
    elif device.type != "cpu":
        raise ConfigurationError(f"REELSTREAM_DEVICE={name!r}: only cpu and cuda are supported")
    return device
