"""Turns a scheduled batch into tensors, runs the model over the paged cache, returns logits."""

from __future__ import annotations

import torch

from edgekv.cache.block_manager import BlockManager
from edgekv.cache.exact_window import ExactWindow
from edgekv.cache.kv_cache import PagedKVCache
from edgekv.engine.scheduler import ScheduledBatch
from edgekv.eviction import Evictor
from edgekv.kernels.cpu_compiled import step_compiled
from edgekv.kernels.cpu_plan import exact_counts, plan_step
from edgekv.kernels.tiered import plan_tiers
from edgekv.models import AttentionMetadata, cpu_fused
from edgekv.models.layers import transpose_for_cpu


class ModelRunner:
    """Owns no state between steps except the model and the cache it writes into."""

    def __init__(self, model: torch.nn.Module, cache: PagedKVCache, manager: BlockManager,
                 device: torch.device, evictor: Evictor | None = None,
                 exact_window: ExactWindow | None = None):
        self.model, self.cache, self.manager, self.device = model, cache, manager, device
        self.evictor = evictor  # gets each step's block mass when its policy reads it
        self.exact_window = exact_window  # each sequence's newest tokens, exact
        layers = getattr(getattr(model, "model", None), "layers", None)
        if device.type == "cpu" and layers is not None:
            transpose_for_cpu(layers)  # a small model's: torch's GEMM reads them faster

    def _layers_compiled(self) -> bool:
        """Whether every decoder layer can take the compiled decode layer (a step planned
        for it that a layer refused would make every layer plan for itself)."""
        ok = self.__dict__.get("_compiled_ok")
        if ok is None:
            layers = getattr(getattr(self.model, "model", None), "layers", None)
            ok = layers is not None and all(cpu_fused.fusable(layer) for layer in layers)
            self._compiled_ok = ok
        return ok

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch, all_logits: bool = False
            ) -> tuple[torch.Tensor, list[int]]:
        """Compute the batch's new tokens. Returns (logits (N, vocab) fp32, rows), one row per
        sequence whose known tokens are now all computed (it samples next); ``rows`` are the
        indices into ``batch.seqs`` of those sequences. With ``all_logits``, the logits of
        every new token (T, vocab) instead."""
        ids, pos, slots, seq_lens, cu, last = [], [], [], [], [0], []
        rows = []
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new, strict=True)):
            start, c = seq.num_computed, seq.num_cached  # token index, cache index
            ids.extend(seq.token_ids[start : start + n])
            p0 = self.manager.tables[seq.seq_id].position(c, self.manager.block_size)
            pos.extend(range(p0, p0 + n))  # rotary positions: the table's (context shift)
            slots.extend(self.manager.slots(seq.seq_id, c, c + n))
            seq_lens.append(c + n)
            cu.append(cu[-1] + n)
            if start + n == seq.num_tokens:
                rows.append(i)
                last.append(cu[-1] - 1)
        tables = [self.manager.block_ids(s.seq_id) for s in batch.seqs]
        width = max(len(t) for t in tables)
        block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables],
                                    dtype=torch.int32)  # (S, width), one op
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            block_tables=block_tables.to(dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=dev),
            max_query_len=max(batch.num_new),
            max_seq_len=max(seq_lens),
            kv_cache=self.cache,
        )
        if self.exact_window is not None:  # no eviction here: cache indices are positions
            starts = [s.num_computed for s in batch.seqs]
            ends = [a + n for a, n in zip(starts, batch.num_new, strict=True)]
            step = self.exact_window.step([s.seq_id for s in batch.seqs], starts, ends)
            meta.exact_window = (self.exact_window, step)
        if self.cache.config.tiers is not None:  # age tiers: each table split by tier
            meta.tiers = plan_tiers(tables, seq_lens, self.cache.offsets,
                                    self.manager.block_size, dev)
        ev = self.evictor
        if ev is not None and ev.needs_mass:
            meta.block_mass = torch.zeros(len(tables), width, dtype=torch.float32, device=dev)
            meta.mass_window = ev.budget.obs_window
        if dev.type == "cpu":  # every layer's rows and decode buckets, planned once
            num_exact = None
            if meta.exact_window is not None and meta.max_query_len == 1:
                num_exact = exact_counts(meta.seq_lens, meta.exact_window[1].start,
                                         self.exact_window.tokens)
            c = self.cache.config
            compiled = (meta.block_mass is None and meta.max_query_len == 1
                        and meta.tiers is None
                        and all(step_compiled(f, c.head_dim)
                                for f in set(self.cache.formats))
                        and self._layers_compiled())
            meta.plan = plan_step(meta.block_tables, meta.seq_lens, meta.slot_mapping,
                                  meta.max_query_len, c.block_size, c.num_kv_heads, num_exact,
                                  compiled)
        input_ids = torch.tensor(ids, dtype=torch.long, device=dev)  # (T,)
        positions = torch.tensor(pos, dtype=torch.long, device=dev)  # (T,)
        hidden = self.model(input_ids, positions, meta)  # (T, hidden)
        if meta.block_mass is not None:
            ev.observe(batch.seqs, batch.num_new, meta.block_mass)
        if all_logits:
            return self.model.compute_logits(hidden), rows
        if not rows:
            return hidden.new_empty(0, 0, dtype=torch.float32), rows
        logits = self.model.compute_logits(hidden[torch.tensor(last, device=dev)])  # (N, V)
        return logits, rows
