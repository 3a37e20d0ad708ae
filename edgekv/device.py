"""Which device a model runs on: the user's choice, checked before anything is loaded."""

from __future__ import annotations

import torch

SUPPORTED = ("cpu", "cuda")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device`` as a ``torch.device`` (None: cuda when available, else cpu).

    Raises ValueError for a name torch does not know, a device type EdgeKV does not run
    on, CUDA on a machine (or a torch build) without it, and a GPU index past the last.
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"unknown device {str(device)!r}; use cpu, cuda or cuda:N") from None
    if dev.type not in SUPPORTED:
        raise ValueError(f"device {str(device)!r} is not supported; use cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"CUDA is not available on this machine (torch "
                             f"{torch.__version__}); use --device cpu")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"device {str(device)!r}: this machine has {count} CUDA "
                             f"device{'s' if count != 1 else ''} (cuda:0..cuda:{count - 1})")
    return dev
