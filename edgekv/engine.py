"""Engine: one step = schedule, run the model, sample, postprocess."""

from __future__ import annotations

import torch

from edgekv.models import ModelConfig

from .block_manager import BlockManager
from .config import CacheConfig
from .detokenizer import IncrementalDetokenizer
from .eviction import EvictionConfig, Evictor
from .kv_cache import PagedKVCache
from .model_runner import ModelRunner
from .sampling import SamplingParams, sample
from .scheduler import ScheduledBatch, Scheduler
from .sequence import Sequence


class Engine:
    """Runs requests to completion over one paged KV cache.

    Contract: ``add`` queues a sequence; each ``step`` advances every scheduled sequence
    by one chunk or one token and returns the sequences that produced a token (finished
    ones included). Token ids and text are appended to the Sequence objects in place.
    """

    def __init__(self, model: torch.nn.Module, model_config: ModelConfig,
                 cache_config: CacheConfig, tokenizer, device: torch.device, seed: int = 0,
                 max_num_batched_tokens: int = 512, max_num_seqs: int = 64,
                 eviction: EvictionConfig | None = None):
        self.model_config, self.cache_config = model_config, cache_config
        self.tokenizer, self.device, self.seed = tokenizer, device, seed
        self.manager = BlockManager(cache_config.num_blocks, cache_config.block_size)
        self.cache = PagedKVCache(cache_config, device)
        self.evictor = None
        if eviction is not None:
            budget = eviction.resolve(cache_config.block_size, cache_config.num_blocks)
            self.evictor = Evictor(budget, self.manager,
                                   mass_norm=model_config.num_layers * model_config.num_heads)
        self.scheduler = Scheduler(self.manager, max_num_batched_tokens, max_num_seqs,
                                   self.evictor)
        self.runner = ModelRunner(model, self.cache, self.manager, device, self.evictor)
        eos = set(model_config.eos_token_ids)
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        self.eos_ids = frozenset(eos)
        self._next_id = 0

    # ---- requests ----------------------------------------------------------------------
    def new_sequence(self, token_ids: list[int], params: SamplingParams,
                     keep_cache: bool = False) -> Sequence:
        seq = Sequence(self._next_id, list(token_ids), params, keep_cache=keep_cache)
        self._next_id += 1
        return seq

    def add(self, seq: Sequence, params: SamplingParams | None = None) -> None:
        """Queue ``seq`` to generate after its current tokens (its prompt, this turn)."""
        if params is not None:
            seq.params = params
        if not seq.token_ids:
            raise ValueError("a prompt must have at least one token")
        max_len = self.model_config.max_position
        if seq.num_tokens >= max_len:
            raise ValueError(f"prompt of {seq.num_tokens} tokens does not fit the model's "
                             f"context of {max_len} tokens")
        vocab = self.model_config.vocab_size
        if min(seq.token_ids) < 0 or max(seq.token_ids) >= vocab:
            raise ValueError(f"token ids must be in [0, {vocab}), got "
                             f"{min(seq.token_ids)}..{max(seq.token_ids)}")
        seq.num_prompt, seq.text, seq.finish_reason = seq.num_tokens, "", None
        seq.new_text.clear()
        seed = seq.params.seed if seq.params.seed is not None else self.seed * 1_000_003 + \
            seq.seq_id
        seq.generator = torch.Generator().manual_seed(seed)
        if self.tokenizer is not None:
            seq.detok = IncrementalDetokenizer(self.tokenizer, seq.token_ids)
        self.scheduler.add(seq)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def drive(self, seq: Sequence):
        """Step until ``seq`` finishes, yielding its text deltas (other requests advance
        too). Closing the generator early aborts the sequence."""
        try:
            while True:
                while seq.new_text:
                    yield seq.new_text.pop(0)
                if seq.finished:
                    return
                self.step()
        finally:
            if not seq.finished:
                self.abort(seq)

    def abort(self, seq: Sequence) -> None:
        """Stop a sequence now (e.g. Ctrl-C); its cache is kept if it is a chat session."""
        if seq in self.scheduler.waiting:
            self.scheduler.waiting.remove(seq)
        self.scheduler.finish(seq, "abort")

    # ---- the step ----------------------------------------------------------------------
    def step(self) -> list[Sequence]:
        batch = self.scheduler.schedule()
        if not batch:
            return []
        logits, rows = self.runner.run(batch)
        for seq, n in zip(batch.seqs, batch.num_new, strict=True):
            seq.num_computed += n
        sampled = [batch.seqs[i] for i in rows]
        if not sampled:  # only prompt chunks ran: nothing to sample yet
            return []
        tokens = sample(logits, [s.params for s in sampled], [s.generator for s in sampled])
        for seq, tok in zip(sampled, tokens, strict=True):
            self._postprocess(seq, tok)
        return sampled

    def _postprocess(self, seq: Sequence, token: int) -> None:
        """Append the token, extend the text, and finish the sequence if it should stop."""
        seq.token_ids.append(token)
        p = seq.params
        reason = None
        if (token in self.eos_ids and not p.ignore_eos) or token in p.stop_token_ids:
            reason = "stop"
        elif seq.detok is not None:
            seq.detok.step(seq.token_ids)
            reason = self._cut_at_stop_string(seq)
        if reason is None and (seq.num_outputs >= p.max_tokens
                               or seq.num_tokens >= self.model_config.max_position):
            reason = "length"
        if reason is not None and seq.detok is not None and not seq.detok.text_cut:
            seq.detok.flush(seq.token_ids)
            self._cut_at_stop_string(seq)
        self._emit(seq, final=reason is not None)
        if reason is not None:
            self.scheduler.finish(seq, reason)

    def _cut_at_stop_string(self, seq: Sequence) -> str | None:
        text = seq.detok.text
        hits = [i for s in seq.params.stop if (i := text.find(s)) >= 0]
        if hits:
            seq.detok.text = text[: min(hits)]
            seq.detok.text_cut = True
            return "stop"
        return None

    def _emit(self, seq: Sequence, final: bool) -> None:
        """Publish new text, holding back a tail that could still become a stop string."""
        if seq.detok is None:
            return
        text = seq.detok.text
        hold = 0 if final else max((len(s) - 1 for s in seq.params.stop), default=0)
        ready = text[: max(len(seq.text), len(text) - hold)]
        if len(ready) > len(seq.text):
            seq.new_text.append(ready[len(seq.text) :])
            seq.text = ready

    @torch.inference_mode()
    def score(self, token_ids: list[int], chunk_size: int | None = None) -> torch.Tensor:
        """Teacher-forced logits (T, vocab) fp32 of every position of ``token_ids``.

        The tokens go through the cache in chunks of ``chunk_size`` (None: one prefill;
        1: token by token, each reading its history from the cache exactly as decode
        does). With an eviction policy, chunks are capped at the KV budget and blocks are
        evicted between them, as in generation. Runs outside the scheduler, between steps,
        and frees its blocks after.
        """
        seq = self.new_sequence(token_ids, SamplingParams(max_tokens=1))
        chunk = chunk_size or max(len(token_ids), 1)
        out = []
        try:
            while seq.num_computed < seq.num_tokens:
                n = min(chunk, seq.num_tokens - seq.num_computed)
                if self.evictor is not None:
                    n = self.evictor.fit(seq, n)
                if not self.manager.can_append(seq.seq_id, n):
                    raise ValueError(f"{seq.num_tokens} tokens do not fit in the KV pool "
                                     f"({self.cache_config.num_blocks} blocks of "
                                     f"{self.cache_config.block_size})")
                _, copies = self.manager.append_slots(seq.seq_id, n)
                logits, _ = self.runner.run(ScheduledBatch([seq], [n], copies),
                                            all_logits=True)
                seq.num_computed += n
                out.append(logits)
        finally:
            if seq.seq_id in self.manager.tables:
                self.manager.free(seq.seq_id)
            if self.evictor is not None:
                self.evictor.forget(seq.seq_id)
        return torch.cat(out)

    # ---- accounting --------------------------------------------------------------------
    def kv_stats(self) -> dict:
        s = self.cache.stats(self.manager)
        s["preemptions"] = self.scheduler.num_preemptions
        s.update(self.evictor.stats() if self.evictor is not None else {"eviction": None})
        return s
