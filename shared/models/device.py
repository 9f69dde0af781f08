"""Where models run: CPU by default, a CUDA device when present and asked for."""

from __future__ import annotations

from pathlib import Path

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


CPU_BFLOAT16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
"""``/proc/cpuinfo`` flags of x86 instructions that multiply bfloat16 matrices natively."""


def resolve_precision(
    name: str, device: torch.device, cpuinfo: Path = Path("/proc/cpuinfo")
) -> torch.dtype:
    """The dtype of a model's matrix products named by ``Settings.text_precision``.

    ``"auto"`` is bfloat16 where the hardware computes it natively (a CUDA device that
    supports it; a CPU whose ``cpuinfo`` flags list AVX-512 BF16 or AMX), float32
    elsewhere: without the instructions bfloat16 is emulated and slower.
    """
    if name == "float32":
        return torch.float32
    if name == "bfloat16":
        return torch.bfloat16
    if device.type == "cuda":
        native = torch.cuda.is_bf16_supported()
    else:
        try:
            flags = {
                flag
                for line in cpuinfo.read_text().splitlines()
                if line.startswith("flags")
                for flag in line.partition(":")[2].split()
            }
        except OSError:
            flags = set()
        native = bool(flags & CPU_BFLOAT16_FLAGS)
    return torch.bfloat16 if native else torch.float32
