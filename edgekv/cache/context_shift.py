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

Moved blocks are rewritten into fresh blocks, and the table points at them only once
every layer is written, so a shift is all or nothing; a block shared with a fork must move
this way (copy-on-write). When the pool is short of fresh blocks, blocks this table holds
alone are rewritten in place instead. Shifts run inside the engine's hold, where a Ctrl-C
waits for a safe point (``guard.py``), so it cannot cut a commit in half.
"""

from __future__ import annotations

import torch

from edgekv.cache.block_manager import BlockManager
from edgekv.cache.kv_cache import PagedKVCache
from edgekv.quant import QuantizedKV


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
        """Free blocks a shift before appending ``n`` tokens needs at least: one per moved
        block another sequence shares (a swapped-out block comes back private)."""
        if not self.needed(seq_id, n):
            return 0
        t, pool = self.manager.tables[seq_id], self.manager.pool
        return sum(t.block_ids[i] is not None and pool.is_shared(t.block_ids[i])
                   for i, _ in self.manager.shift_plan(seq_id))

    def fit(self, seq_id: int, n: int) -> None:
        """Shift ``seq_id`` if its next ``n`` tokens need it. The caller has checked that
        ``blocks_needed`` blocks are free; afterwards the tokens fit the context."""
        if self.needed(seq_id, n):
            self.shift(seq_id)
        assert not self.needed(seq_id, n), f"sequence {seq_id}: {n} tokens exceed the context"

    def shift(self, seq_id: int) -> None:
        """Move every entry of ``seq_id`` to its cache index. All or nothing: the moved
        blocks are written into fresh blocks, and only then does the table point at them
        (the old ones lose this table's reference). When the pool is short, blocks held by
        this table alone are rewritten in place instead, in one commit with the table.
        Called inside the engine's hold (Ctrl-C deferred to safe points)."""
        mgr = self.manager
        t, pool = mgr.tables[seq_id], mgr.pool
        plan = mgr.shift_plan(seq_id)
        if not plan:
            return
        assert not t.host, f"shifting swapped-out sequence {seq_id}"
        src = [t.block_ids[i] for i, _ in plan]
        everything = pool.num_free >= len(plan)
        fresh_at = [j for j, b in enumerate(src) if everything or pool.is_shared(b)]
        stay_at = [j for j, b in enumerate(src) if not (everything or pool.is_shared(b))]
        dev = self.cache.device
        src_t = torch.tensor(src, device=dev)
        delta = torch.tensor([d for _, d in plan], device=dev)
        new_keys = []  # per layer: the moved blocks' keys, quantized again
        for fmt, (k_store, _) in zip(self.cache.formats, self.cache.layers, strict=True):
            k = fmt.dequantize(_gather(k_store, src_t))  # (nb, Hkv, bs, D) fp32
            new_keys.append(fmt.quantize(rotate_keys(k, delta, self.inv_freq.to(dev))))
        fresh = pool.allocate(len(fresh_at))  # NoFreeBlocks: nothing changed
        dst, committed = list(src), False
        try:  # fresh blocks: nothing points at them until the table is committed
            for j, b in zip(fresh_at, fresh, strict=True):
                dst[j] = b
            self._store(new_keys, fresh_at, src_t, torch.tensor(dst, device=dev), values=True)
            # in-place bytes and the table, together (no Ctrl-C here: guard.py)
            self._store(new_keys, stay_at, src_t, src_t, values=False)
            for j, (i, _) in enumerate(plan):
                mgr.reposition(seq_id, i, dst[j] if j in fresh_at else None)
            committed = True
        finally:
            if not committed:
                for b in fresh:
                    pool.release(b)
        self.shifts += 1
        self.shifted_blocks += len(plan)

    def _store(self, new_keys: list[QuantizedKV], at: list[int], src_t: torch.Tensor,
               dst_t: torch.Tensor, values: bool) -> None:
        """Write rows ``at`` of each layer's ``new_keys`` into blocks ``dst_t[at]`` (and,
        with ``values``, copy the values of ``src_t[at]`` there)."""
        if not at:
            return
        at_t = torch.tensor(at, device=src_t.device)
        src, dst = src_t[at_t], dst_t[at_t]
        for (k_store, v_store), new in zip(self.cache.layers, new_keys, strict=True):
            for part in ("data", "scale", "zero"):
                kt, vt = getattr(k_store, part), getattr(v_store, part)
                if kt is not None:
                    kt[dst] = getattr(new, part)[at_t]
                if vt is not None and values:
                    vt[dst] = vt[src]

    def stats(self) -> dict:
        return {"context_shifts": self.shifts, "shifted_blocks": self.shifted_blocks}


def _gather(store: QuantizedKV, ids: torch.Tensor) -> QuantizedKV:
    return QuantizedKV(store.data[ids], None if store.scale is None else store.scale[ids],
                       None if store.zero is None else store.zero[ids])
