"""Context shift: keep every rotary position inside the model's context under eviction.

With an eviction policy a sequence keeps at most its budget of tokens, but its tokens
keep their positions, so a long enough conversation would reach positions the model was
never trained on (``max_position``). Positions are therefore taken inside the cache, not
in the text (StreamingLLM): when the next tokens would reach ``max_position``, every kept
entry whose rotary position differs from its cache index is moved down to that index,
and new tokens continue from there.

Keys are stored after RoPE, and RoPE at position ``p - d`` is RoPE at ``p`` followed by a
rotation by ``-d``. So a shift dequantizes the moved blocks' keys, rotates them by ``-d``
and quantizes them again (values are untouched). This happens once every
``max_position - budget`` tokens, not at every eviction: each shift costs one
re-quantization of the kept keys (``scripts/bench_context_shift.py`` measures it).

::

    positions:  [ 0 | 16 | 80 | 96 | 112 ]   sink, then blocks whose predecessors went
    indices:    [ 0 | 16 | 32 | 48 |  64 ]   shift: entries 2..4 rotate by -48, and the
                                             next token takes position 64 + its offset

A moved block held by this table alone is rewritten in place; a shared one (a fork) is
rewritten into a fresh block. The bytes of all layers are computed first and committed
together with the table, with Ctrl-C held back (``interrupts.py``): a shift is all or
nothing.
"""

from __future__ import annotations

import torch

from edgekv.quant import QuantizedKV

from .block_manager import BlockManager
from .interrupts import deferred_interrupts
from .kv_cache import PagedKVCache


def rotate_keys(k: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Move rotate-half RoPE keys from position p to p - delta.

    k:        (nb, Hkv, bs, D) fp32, keys after RoPE
    delta:    (nb,) int64, one shift per block
    inv_freq: (D / 2,) the model's rotary inverse frequencies
    """
    freqs = -delta.double()[:, None] * inv_freq.double()[None, :]  # (nb, D/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (nb, D)
    cos = emb.cos().float()[:, None, None, :]  # (nb, 1, 1, D)
    sin = emb.sin().float()[:, None, None, :]
    k1, k2 = k.chunk(2, dim=-1)
    return k * cos + torch.cat([-k2, k1], dim=-1) * sin


class ContextShift:
    """Moves a sequence's kept entries down to their cache indices when its next tokens
    would reach ``max_position``. Mutates block tables only through ``shift``."""

    def __init__(self, manager: BlockManager, cache: PagedKVCache, inv_freq: torch.Tensor,
                 max_position: int):
        self.manager, self.cache, self.max_position = manager, cache, max_position
        self.inv_freq = inv_freq.detach().float().cpu()
        self.shifts = 0  # shifts done
        self.shifted_blocks = 0  # blocks re-rotated by them

    def needed(self, seq_id: int, n: int) -> bool:
        """Whether appending ``n`` tokens to ``seq_id`` reaches ``max_position``."""
        t = self.manager.tables.get(seq_id)
        if t is None:
            return False
        return t.position(t.num_tokens, self.manager.block_size) + n > self.max_position

    def blocks_needed(self, seq_id: int, n: int) -> int:
        """Free blocks a shift before appending ``n`` tokens takes (shared moved blocks)."""
        if not self.needed(seq_id, n):
            return 0
        t, pool = self.manager.tables[seq_id], self.manager.pool
        return sum(pool.is_shared(t.block_ids[i]) for i, _ in self.manager.shift_plan(seq_id))

    def fit(self, seq_id: int, n: int) -> None:
        """Shift ``seq_id`` if its next ``n`` tokens need it. The caller has checked that
        ``blocks_needed`` blocks are free; afterwards the tokens fit the context."""
        if self.needed(seq_id, n):
            self.shift(seq_id)
        assert not self.needed(seq_id, n), f"sequence {seq_id}: {n} tokens exceed the context"

    def shift(self, seq_id: int) -> None:
        mgr = self.manager
        t, pool = mgr.tables[seq_id], mgr.pool
        plan = mgr.shift_plan(seq_id)
        if not plan:
            return
        assert not t.host, f"shifting swapped-out sequence {seq_id}"
        src = [t.block_ids[i] for i, _ in plan]
        shared = [pool.is_shared(b) for b in src]
        dev = self.cache.device
        src_t = torch.tensor(src, device=dev)
        delta = torch.tensor([d for _, d in plan], device=dev)
        fmt, inv = self.cache.format, self.inv_freq.to(dev)
        new_keys = []  # per layer: the moved blocks' keys, quantized again
        for k_store, _ in self.cache.layers:
            k = fmt.dequantize(_gather(k_store, src_t))  # (nb, Hkv, bs, D) fp32
            new_keys.append(fmt.quantize(rotate_keys(k, delta, inv)))
        fresh = sum(shared)
        with deferred_interrupts():  # bytes and table together, or not at all
            dst = list(src)
            for j, new in zip([j for j, s in enumerate(shared) if s],
                              pool.allocate(fresh), strict=True):
                dst[j] = new
            dst_t = torch.tensor(dst, device=dev)
            for (k_store, v_store), new in zip(self.cache.layers, new_keys, strict=True):
                for part in ("data", "scale", "zero"):
                    kt, vt = getattr(k_store, part), getattr(v_store, part)
                    if kt is not None:
                        kt[dst_t] = getattr(new, part)
                    if vt is not None and fresh:
                        vt[dst_t] = vt[src_t]
            for (i, _), s, b in zip(plan, shared, dst, strict=True):
                mgr.reposition(seq_id, i, b if s else None)
        self.shifts += 1
        self.shifted_blocks += len(plan)

    def stats(self) -> dict:
        return {"context_shifts": self.shifts, "shifted_blocks": self.shifted_blocks}


def _gather(store: QuantizedKV, ids: torch.Tensor) -> QuantizedKV:
    return QuantizedKV(store.data[ids], None if store.scale is None else store.scale[ids],
                       None if store.zero is None else store.zero[ids])
