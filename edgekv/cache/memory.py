"""How much memory the KV pool may take when the user does not say (``kv_memory=None`` or
``"auto"``), using the planner's headroom model (``edgekv.plan.headroom``).

    GPU:  kv = free - headroom          free: ``torch.cuda.mem_get_info`` after the weights
                                        are loaded (the CUDA context is already paid for);
                                        headroom: activations of one prefill chunk, logits of
                                        max_num_seqs rows, the int8/nf4 dequant buffer, 3%
                                        fragmentation
    CPU:  kv = CPU_FRACTION x available RAM   the torch reference path materialises
                                        (tokens x context) scores, so a GPU-style activation
                                        estimate does not hold there; a fixed share does
    both: kv <= max_num_seqs x max_position x bytes_per_token (no more than can be used),
          rounded down to whole blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import psutil
import torch

from edgekv.config import kv_bytes_per_token
from edgekv.models import ModelConfig
from edgekv.plan.headroom import PREFILL_CHUNK, Headroom, headroom
from edgekv.units import gib

CPU_FRACTION = 0.25


def available_bytes(device: torch.device) -> int:
    """Free device memory now (CUDA), or the OS's available memory (CPU)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    return psutil.virtual_memory().available  # Linux MemAvailable; macOS, Windows alike


@dataclass(frozen=True)
class KVPlan:
    """What ``LLM(kv_memory=None | "auto")`` chose for its KV pool, and from what."""

    device: str
    available_bytes: int  # free GPU memory, or available RAM, when the pool was sized
    headroom: Headroom | None  # held back on a GPU (None on a CPU: a fixed share is used)
    cap_bytes: int  # what max_num_seqs sequences of max_position tokens would use
    kv_bytes: int  # the pool: whole blocks
    kv_format: str
    bytes_per_token: int
    block_size: int

    @property
    def num_blocks(self) -> int:
        return self.kv_bytes // (self.bytes_per_token * self.block_size)

    @property
    def tokens(self) -> int:
        return self.num_blocks * self.block_size

    def summary(self) -> str:
        if self.headroom is not None:
            why = (f"{gib(self.available_bytes)} free on {self.device} minus "
                   f"{gib(self.headroom.total)} headroom")
        else:
            why = f"{CPU_FRACTION:.0%} of {gib(self.available_bytes)} available RAM"
        capped = " (capped at what max_num_seqs x max_position can use)" \
            if self.kv_bytes + self.bytes_per_token * self.block_size > self.cap_bytes else ""
        return (f"KV pool {gib(self.kv_bytes)} = {self.tokens:,} tokens of "
                f"{self.kv_format} ({self.num_blocks:,} blocks of {self.block_size}): "
                f"{why}{capped}")


def auto_kv_plan(device: torch.device, cfg: ModelConfig, kv_format: str, block_size: int = 16,
                 max_num_seqs: int = 64, chunk_tokens: int | None = None,
                 weights: str | None = None) -> KVPlan:
    """Size the KV pool from the memory ``device`` has now (module docstring).

    Call after the model is loaded. Raises ValueError if not even one block fits.
    """
    per_token = kv_bytes_per_token(kv_format, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim)
    per_block = per_token * block_size
    cap = max_num_seqs * cfg.max_position * per_token
    avail = available_bytes(device)
    room = None
    if device.type == "cuda":
        room = headroom(cfg, avail, quantized_weights=weights is not None,
                        chunk_tokens=chunk_tokens or PREFILL_CHUNK["cuda"],
                        num_seqs=max_num_seqs, include_context=False)
        budget = avail - room.total
    else:
        budget = int(avail * CPU_FRACTION)
    kv = min(budget, cap) // per_block * per_block
    if kv <= 0:
        held = f", {room.total:,} held back as headroom" if room is not None else ""
        raise ValueError(f"not enough free memory on {device} for one {kv_format} KV block "
                         f"of {per_block:,} bytes ({avail:,} bytes available{held}); free "
                         f"memory or pass kv_memory=")
    return KVPlan(str(device), avail, room, cap, kv, kv_format, per_token, block_size)
