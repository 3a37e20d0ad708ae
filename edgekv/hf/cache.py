"""``PagedQuantizedCache``: a transformers ``Cache`` whose K/V live in EdgeKV's quantized blocks.

    cache = PagedQuantizedCache(model.config, kv_format="int8")
    out = model.generate(**inputs, past_key_values=cache, max_new_tokens=64)

Each attention layer calls ``update(k, v)`` with the new tokens' K/V, (B, Hkv, n, D), keys
after RoPE. The layer quantizes them into its blocks (one EdgeKV sequence per batch row),
then returns the whole history dequantized, (B, Hkv, L, D) in the model's dtype, for
transformers' own attention to use. The bytes kept between steps are the format's
(``fp16``: 2 bytes per value; ``int8``/``int4``: codes + per-token-head scales), not the
model dtype's. Unlike transformers' ``QuantizedCache`` there is no full-precision residual:
new tokens are attended to as they are stored, exactly as EdgeKV's engine does.

Beam search and the batch reshuffles of ``generate`` (``reorder_cache``,
``batch_select_indices``, ``batch_repeat_interleave``) fork block tables instead of
copying K/V: rows that share a history share its blocks, copy-on-write.

Needs transformers' layered Cache API (``CacheLayerMixin``, transformers >= 4.56).
"""

from __future__ import annotations

import weakref

import torch
from transformers import Cache, PretrainedConfig
from transformers.cache_utils import CacheLayerMixin

from edgekv.cache.memory import KVPlan, auto_kv_plan
from edgekv.config import CacheConfig
from edgekv.models import ModelConfig
from edgekv.plan import config_from_hf_dict
from edgekv.quant import get_format
from edgekv.units import parse_memory

from .pool import KVPool


class _Rows:
    """The pool sequences behind a cache's batch rows; shared by all of its layers.

    ``release`` is the cache's finalizer, so nothing here may refer to the cache.
    """

    def __init__(self, cfg: ModelConfig, kv_format: str, kv_memory: int | None,
                 block_size: int, pool: KVPool | None):
        self.cfg, self.kv_format, self.kv_memory, self.block_size = (cfg, kv_format, kv_memory,
                                                                     block_size)
        self.pool = pool
        self.plan: KVPlan | None = None
        self.ids: list[int] = []
        self.reserved = 0  # slots reserved per row; every layer writes into the same ones

    def start(self, k: torch.Tensor) -> None:
        """On the first update: make the pool (if the cache owns one) and one sequence per
        row. k: (B, Hkv, n, D)."""
        c = self.cfg
        if k.shape[1] != c.num_kv_heads or k.shape[3] != c.head_dim:
            raise ValueError(f"expected K/V of shape (batch, {c.num_kv_heads}, tokens, "
                             f"{c.head_dim}) from the model's config, got {tuple(k.shape)}")
        if self.pool is None:
            budget = self.kv_memory
            if budget is None:
                self.plan = auto_kv_plan(k.device, c, self.kv_format, self.block_size,
                                         max_num_seqs=k.shape[0])
                budget = self.plan.kv_bytes
            self.pool = KVPool(CacheConfig.for_budget(budget, c.num_layers, c.num_kv_heads,
                                                      c.head_dim, self.block_size,
                                                      self.kv_format), k.device)
        if self.pool.device.type != k.device.type:
            raise ValueError(f"the KV pool is on {self.pool.device}, the model on {k.device}")
        if not self.ids:
            self.ids = self.pool.new_sequences(k.shape[0])

    def reserve(self, num_tokens: int) -> None:
        self.pool.reserve(self.ids, num_tokens)
        self.reserved = num_tokens

    def remap(self, rows: list[int]) -> None:
        """Row i becomes a fork of old row ``rows[i]``; the old sequences are dropped."""
        if not self.ids:
            return
        new = [self.pool.fork(self.ids[r]) for r in rows]
        self.pool.free(self.ids)
        self.ids = new

    def release(self) -> None:
        if self.pool is not None and self.ids:
            self.pool.free(self.ids)
        self.ids, self.reserved = [], 0


class PagedQuantizedLayer(CacheLayerMixin):
    """One attention layer's view of the rows: its own length, the shared blocks."""

    is_compileable = False
    is_sliding = False
    is_croppable = True
    supports_early_init = False

    def __init__(self, layer_idx: int, rows: _Rows):
        super().__init__()
        self.layer_idx, self.rows, self.length = layer_idx, rows, 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new tokens, return the history. In: (B, Hkv, n, D) each;
        out: (B, Hkv, length + n, D) each, dequantized, in key_states' dtype."""
        rows = self.rows
        if not self.is_initialized:
            rows.start(key_states)
            self.lazy_initialization(key_states, value_states)
        if key_states.shape[0] != len(rows.ids):
            raise ValueError(f"the cache holds {len(rows.ids)} rows, the model sent "
                             f"{key_states.shape[0]}")
        start, end = self.length, self.length + key_states.shape[-2]
        if end > rows.reserved:
            rows.reserve(end)
        rows.pool.write(self.layer_idx, key_states, value_states, rows.ids, start)
        self.length = end
        return rows.pool.read(self.layer_idx, rows.ids, end, key_states.dtype)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.length, self.is_initialized = 0, False

    def offload(self) -> None:  # the pool's device is fixed
        pass

    def prefetch(self) -> None:
        pass

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("rows are shared by all layers: call reorder_cache on the "
                                  "PagedQuantizedCache")


class PagedQuantizedCache(Cache):
    """A transformers Cache storing K/V in EdgeKV's paged blocks, in any EdgeKV format.

    ``config``: the model's config (layers, KV heads, head_dim; full attention only).
    ``kv_format``: an ``edgekv.quant`` format. ``kv_memory``: the size of this cache's own
    pool ("256MiB", bytes), made on the first update on the model's device; None sizes it
    from free memory, no larger than batch x max_position_embeddings tokens need
    (``edgekv.cache.memory``). ``pool``: a ``KVPool`` to share instead (kv_format, kv_memory and
    block_size then come from it).

    Contract: when the cache is reset, or dropped (garbage-collected), its sequences' blocks
    return to the pool. A full pool raises ``NoFreeBlocks`` from ``update``.
    """

    def __init__(self, config: PretrainedConfig, kv_format: str = "int8",
                 kv_memory: int | str | None = None, block_size: int = 16,
                 pool: KVPool | None = None):
        text = config.get_text_config(decoder=True)
        _check_full_attention(text)
        cfg = config_from_hf_dict(text.to_dict(), type(config).__name__)
        if pool is not None:
            pc = pool.config
            if (pc.num_layers, pc.num_kv_heads, pc.head_dim) != (cfg.num_layers,
                                                               cfg.num_kv_heads, cfg.head_dim):
                raise ValueError(f"the pool stores {pc.num_layers} layers x {pc.num_kv_heads} "
                                 f"KV heads x {pc.head_dim}; the model has {cfg.num_layers} x "
                                 f"{cfg.num_kv_heads} x {cfg.head_dim}")
            kv_format, block_size = pc.kv_format, pc.block_size
        get_format(kv_format).check_head_dim(cfg.head_dim)
        budget = None if kv_memory is None or pool is not None else parse_memory(kv_memory)
        self._rows = _Rows(cfg, kv_format, budget, block_size, pool)
        super().__init__(layers=[PagedQuantizedLayer(i, self._rows)
                                 for i in range(cfg.num_layers)])
        weakref.finalize(self, self._rows.release)

    # ---- what it holds -----------------------------------------------------------------
    @property
    def pool(self) -> KVPool | None:
        """The pool holding this cache's blocks (None before the first update of a cache
        that makes its own)."""
        return self._rows.pool

    @property
    def kv_plan(self) -> KVPlan | None:
        """How the pool was sized when kv_memory was None (after the first update)."""
        return self._rows.plan

    def kv_stats(self) -> dict:
        """The pool's blocks and bytes (``PagedKVCache.stats``); empty before the first
        update of a cache that makes its own pool."""
        return {} if self.pool is None else self.pool.stats()

    # ---- changes to all layers at once -------------------------------------------------
    def reset(self) -> None:
        """Free every row's blocks; the cache is empty and reusable."""
        self._rows.release()
        for layer in self.layers:
            layer.reset()

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` tokens (a negative count, as transformers
        passes it)."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of tokens to remove, got "
                             f"{tokens_to_remove}")
        keep = max(self.get_seq_length() + tokens_to_remove, 0)
        for layer in self.layers:
            layer.length = min(layer.length, keep)
        if self._rows.ids:
            self._rows.pool.truncate(self._rows.ids, keep)
            self._rows.reserved = min(self._rows.reserved, keep)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._rows.remap(beam_idx.tolist())

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if indices.dtype == torch.bool:
            indices = indices.nonzero().flatten()
        self._rows.remap(indices.tolist())

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._rows.remap([r for r in range(len(self._rows.ids)) for _ in range(repeats)])


def _check_full_attention(text: PretrainedConfig) -> None:
    """Raise ValueError unless every layer attends to the whole history (no sliding window,
    no chunked or linear attention): the cache keeps every token."""
    types = set(getattr(text, "layer_types", None) or [])
    if not types and getattr(text, "use_sliding_window", True) is not False:
        if getattr(text, "sliding_window", None) is not None:
            types.add("sliding_attention")
        if getattr(text, "attention_chunk_size", None) is not None:
            types.add("chunked_attention")
    other = sorted(types - {"full_attention"})
    if other:
        raise ValueError(f"PagedQuantizedCache supports full-attention layers only; this "
                         f"model has {', '.join(other)} layers")
