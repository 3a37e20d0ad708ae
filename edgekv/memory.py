"""How much memory the KV pool may take when the user does not say."""

from __future__ import annotations

import os

import torch

# On a GPU, the pool takes this share of the memory left after the weights; the rest is
# headroom for activations, the allocator's fragmentation and other processes.
GPU_FRACTION = 0.80
# On a CPU the pool is capped by what the longest useful contexts need, and by this share
# of the memory available now.
CPU_FRACTION = 0.25


def available_bytes(device: torch.device) -> int:
    """Free device memory now (CUDA), or the OS's available memory (CPU)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def auto_kv_budget(device: torch.device, bytes_per_token: int, useful_tokens: int) -> int:
    """Bytes for the KV pool: a share of free memory, never more than ``useful_tokens``
    tokens need (e.g. max concurrent sequences x the model's context)."""
    share = GPU_FRACTION if device.type == "cuda" else CPU_FRACTION
    return int(min(available_bytes(device) * share, useful_tokens * bytes_per_token))
