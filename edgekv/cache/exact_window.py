"""Exact window: each sequence's newest tokens kept exact beside the quantized blocks.

Quantization error hurts most where attention looks most: the newest tokens. With
``LLM(exact_window=R)`` every new K/V is written to its quantized block as always, and also,
in fp16, to a ring of R entries that belongs to its sequence (cache index c at ring index
``c % R``). The query at position p reads its R newest keys (p - R < j <= p) exact and
older ones from the blocks (``kernels/window_attention.py``). Nothing is ever re-quantized: a
token leaves the window simply by being overwritten in the ring.

::

    keys:       0 ........................ p-R+1 ...... p          (query at position p)
    read from:  quantized blocks           | exact (fp16) |          R = exact_window

A ring holds positions [start, end). A write of positions [a, b) continues the ring if it
starts inside it (a chat that rewinds writes again from a < end: the overwritten entries
leave it); otherwise (a sequence whose ring went to another while it was swapped out, or
one that starts from cached prefix blocks) the ring starts over at a, and the tokens
before a are read from the blocks.

Rings are handed out on a sequence's first write. A sequence whose blocks are freed
(finished, preempted for recompute, a parked chat given up) loses its ring with them
(``forget``): its tokens may come back different (a rewound chat), so nothing of the old
ring may be read again. The storage grows with the number of rings in use, up to
``max_slots``; past that the least recently written ring of a live sequence is taken
(that sequence starts over on its next write). The bytes are reported by ``kv_stats()``.
Forks (n > 1 samples, beams) get a copy of their parent's ring. Not combined with token
eviction (cache indices then stop being positions).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from edgekv.kernels import get_backend
from edgekv.kernels.window_attention import ExactWindowKV


def check_exact_window(tokens, kv_format: str, eviction) -> None:
    """``LLM(exact_window=tokens)``'s settings: a count >= 0, a quantized ``kv_format``, no
    eviction (``eviction`` None) and a torch prefill path; ValueError (one line)."""
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
        raise ValueError(f"exact_window must be a number of tokens >= 0, got {tokens!r}")
    if tokens and all(n in ("fp16", "bf16", "fp32") for n in kv_format.split(",")):
        raise ValueError(f"exact_window keeps the newest tokens unquantized; {kv_format} is "
                         f"not quantized")
    if tokens and eviction is not None:
        raise ValueError("exact_window cannot be combined with eviction yet")
    if tokens and get_backend() == "triton":
        raise ValueError("exact_window needs the torch prefill path, which the forced "
                         "'triton' attention backend forbids: use 'auto' or 'torch'")


@dataclass
class _Ring:
    slot: int
    start: int  # first position held exactly
    end: int  # one past the last position written
    used: int  # step of the last write (least recently written rings are reclaimed first)


@dataclass(frozen=True)
class ExactWindowStep:
    """One step's rings: where each new token goes, what each sequence reads exact.

    src, dst:    (W,) int64 the new tokens that enter a ring (indices into this step's T
                 tokens) and their flat ring rows (slot * R + position % R); planned on the
                 host so that writing them needs no device sync
    slots:       (S,) int64 each sequence's ring (0 where it has none)
    start:       (S,) int64 first position held exactly, this step's tokens included
                 (the written end where a sequence has no ring: nothing is exact)
    """

    src: torch.Tensor
    dst: torch.Tensor
    slots: torch.Tensor
    start: torch.Tensor
    num_tokens: int

    @property
    def write_index(self) -> torch.Tensor:
        """(T,) the ring row of each new token, -1 for one that enters no ring."""
        out = torch.full((self.num_tokens,), -1, dtype=torch.long, device=self.dst.device)
        out[self.src] = self.dst
        return out


class ExactWindow:
    """``alive(seq_id)``: whether a sequence still holds cache blocks; the rings of those
    that do not are handed out again before the storage grows."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, tokens: int,
                 device: torch.device | str, max_slots: int, alive: Callable[[int], bool]):
        assert tokens > 0 and max_slots > 0
        self.tokens, self.max_slots, self.device = tokens, max_slots, torch.device(device)
        self.alive = alive
        self.shape = (tokens, num_kv_heads, head_dim)
        # per layer (K, V): (slots, R, Hkv, D) fp16, grown as rings are handed out
        self.layers = [(self._empty(0), self._empty(0)) for _ in range(num_layers)]
        self.rings: dict[int, _Ring] = {}
        self._free: list[int] = []
        self._steps = 0
        self.reclaimed = 0  # rings taken from a sequence that still had one

    def _empty(self, slots: int) -> torch.Tensor:
        return torch.zeros(slots, *self.shape, dtype=torch.float16, device=self.device)

    @property
    def num_slots(self) -> int:
        return self.layers[0][0].shape[0] if self.layers else 0

    # ---- per step ----------------------------------------------------------------------
    def step(self, seq_ids: list[int], starts: list[int], ends: list[int]) -> ExactWindowStep:
        """Plan a step in which sequence ``seq_ids[i]`` writes positions
        [starts[i], ends[i]) (its cache indices; every sequence of the batch, in order).
        Hands out, continues or restarts rings; the ring bytes are written per layer by
        ``write``."""
        self._steps += 1
        R = self.tokens
        src, dst, slots, first_exact = [], [], [], []
        batch, num_tokens = set(seq_ids), 0
        for sid, a, b in zip(seq_ids, starts, ends, strict=True):
            t = num_tokens  # this sequence's first token in the step
            num_tokens += b - a
            ring = self.rings.get(sid)
            if ring is not None and not ring.start <= a <= ring.end:
                ring.start = ring.end = a  # not a continuation: start over at a
            if ring is None:
                ring = self._acquire(sid, a, batch)
            if ring is None:  # every ring is in this batch: read the blocks
                slots.append(0)
                first_exact.append(b)
                continue
            slots.append(ring.slot)
            first_exact.append(ring.start)  # held before this step, or a if started now
            ring.start, ring.end, ring.used = max(ring.start, b - R), b, self._steps
            first = max(a, b - R)  # a chunk longer than the ring keeps its last R tokens
            src.extend(range(t + first - a, t + b - a))
            dst.extend(ring.slot * R + p % R for p in range(first, b))
        dev = self.device
        return ExactWindowStep(*(torch.tensor(x, dtype=torch.long, device=dev)
                              for x in (src, dst, slots, first_exact)), num_tokens=num_tokens)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, step: ExactWindowStep) -> None:
        """Store this step's new K/V (T, Hkv, D), original basis, in their rings."""
        for ring, x in zip(self.layers[layer], (k, v), strict=True):
            ring.view(-1, *self.shape[1:])[step.dst] = x[step.src].to(ring.dtype)

    def kv(self, layer: int, step: ExactWindowStep, new_k: torch.Tensor | None = None,
           new_v: torch.Tensor | None = None) -> ExactWindowKV:
        """What attention reads exact. Decode: after ``write`` (the ring holds the new
        token). Prefill: before ``write``, with the chunk's own K/V as ``new_k``/``new_v``."""
        k, v = self.layers[layer]
        return ExactWindowKV(k, v, step.slots, step.start, new_k, new_v)

    # ---- sequences ---------------------------------------------------------------------
    @torch.inference_mode()  # the rings may have been made under inference mode
    def fork(self, parent: int, child: int) -> None:
        """The child continues a copy of the parent's ring (if a ring is free for it)."""
        ring = self.rings.get(parent)
        if ring is None:
            return
        new = self._acquire(child, ring.start, {parent})
        if new is None:
            return
        new.end = ring.end
        for k, v in self.layers:
            k[new.slot] = k[ring.slot]
            v[new.slot] = v[ring.slot]

    def forget(self, seq_id: int) -> None:
        """The sequence's blocks were freed: its ring is free again."""
        ring = self.rings.pop(seq_id, None)
        if ring is not None:
            self._free.append(ring.slot)

    def stats(self) -> dict:
        per_ring = 2 * len(self.layers) * self.tokens * self.shape[1] * self.shape[2] * 2
        return {"exact_window_tokens": self.tokens, "exact_window_rings": len(self.rings),
                "exact_window_bytes": self.num_slots * per_ring}

    def _acquire(self, sid: int, start: int, busy: set[int]) -> _Ring | None:
        if not self._free:  # rings of finished or freed sequences first
            for s in [s for s in self.rings if s not in busy and not self.alive(s)]:
                self._free.append(self.rings.pop(s).slot)
        if not self._free and self.num_slots < self.max_slots:
            self._grow(min(self.max_slots, max(2 * self.num_slots, 4)))
        if not self._free:  # reclaim the least recently written ring not in use now
            idle = [s for s in self.rings if s not in busy]
            if not idle:
                return None
            victim = min(idle, key=lambda s: self.rings[s].used)
            self._free.append(self.rings.pop(victim).slot)
            self.reclaimed += 1
        ring = _Ring(self._free.pop(), start, start, self._steps)
        self.rings[sid] = ring
        return ring

    def _grow(self, slots: int) -> None:
        n = self.num_slots
        grown = []
        for k, v in self.layers:
            k2, v2 = self._empty(slots), self._empty(slots)
            k2[:n], v2[:n] = k, v
            grown.append((k2, v2))
        self.layers = grown
        self._free.extend(range(slots - 1, n - 1, -1))  # pop() hands out the lowest first
