"""Engine: one step = schedule, run the model, sample, postprocess."""

from __future__ import annotations

import copy
import dataclasses
from collections import deque
from contextlib import contextmanager

import torch

from edgekv.cache.block_manager import BlockManager
from edgekv.cache.context_shift import ContextShift
from edgekv.cache.exact_window import ExactWindow
from edgekv.cache.kv_cache import PagedKVCache
from edgekv.cache.offload import Offloader
from edgekv.cache.prefix_cache import cache_salt
from edgekv.config import CacheConfig
from edgekv.engine.beam_search import BeamSearch
from edgekv.engine.detokenizer import IncrementalDetokenizer
from edgekv.engine.guard import EngineGuard
from edgekv.engine.integrity import check_engine
from edgekv.engine.model_runner import ModelRunner
from edgekv.engine.requests import check_request
from edgekv.engine.rollback import StepUndo
from edgekv.engine.sampling import SamplingParams, request_seed, sample, token_logprobs
from edgekv.engine.scheduler import Scheduler
from edgekv.engine.sequence import Sequence, Status
from edgekv.engine.stats import kv_stats
from edgekv.engine.stop_strings import cut_at_stop_string, emit_text
from edgekv.eviction import EvictionConfig, Evictor
from edgekv.models import ModelConfig
from edgekv.models.layers import rope_inv_freq
from edgekv.tiers.demote import Demoter


class Engine:
    """Runs requests to completion over one paged KV cache.

    Contract: ``add`` queues a sequence; each ``step`` advances every scheduled sequence
    by one chunk or one token and returns the sequences that produced a token (finished
    ones included). Token ids and text are appended to the Sequence objects in place.
    A request with ``params.n > 1`` forks its other samples when its prompt is computed
    (``seq.samples``); one with ``beam_width`` set is driven by ``seq.beam``.

    ``prefix_caching``: reuse cached blocks of matching prompt prefixes. ``num_host_blocks``
    > 0: a host pool of that many blocks for offload (swap instead of recompute).
    ``exact_window_tokens`` > 0: each sequence's newest tokens are also kept exact and read
    from there (cache/exact_window.py); not with eviction.

    Transactions: ``step`` either completes or, whatever stage raised (schedule, a block
    copy, a swap, the model run, sampling, detokenizing, postprocessing), rolls back what
    it had not committed (``rollback.py``): block tables never run ahead of what is cached,
    and a sequence whose token was computed but not sampled computes it again. Requests are
    live from ``add`` until their last sequence (forked samples and beams included)
    finishes or is aborted; ``check_integrity()`` checks all of this. One thread at a time
    drives the engine: callers ``hold()`` it (guard.py).
    """

    def __init__(self, model: torch.nn.Module, model_config: ModelConfig,
                 cache_config: CacheConfig, tokenizer, device: torch.device, seed: int = 0,
                 max_num_batched_tokens: int = 512, max_num_seqs: int = 64,
                 eviction: EvictionConfig | None = None, prefix_caching: bool = True,
                 num_host_blocks: int = 0, exact_window_tokens: int = 0):
        tiers = cache_config.tiers
        if tiers is not None and (eviction is not None or num_host_blocks):
            raise ValueError("kv_tiers cannot be combined with eviction or offload yet")
        self.model_config, self.cache_config = model_config, cache_config
        self.tokenizer, self.device, self.seed = tokenizer, device, seed
        self.manager = BlockManager(cache_config.num_blocks, cache_config.block_size,
                                    num_host_blocks, None if tiers is None else tiers.blocks)
        self.cache = PagedKVCache(cache_config, device)
        # age tiers: blocks demoted as they age (edgekv/tiers/demote.py)
        self.demoter = None if tiers is None else Demoter(tiers, self.manager, self.cache,
                                                          exact_window_tokens)
        self.offloader = None
        if num_host_blocks:
            host_cfg = dataclasses.replace(cache_config, num_blocks=num_host_blocks)
            host = PagedKVCache(host_cfg, "cpu", pin_memory=torch.device(device).type == "cuda")
            self.offloader = Offloader(self.manager, self.cache, host)
        self.evictor = self.shifter = None
        if eviction is not None:
            budget = eviction.resolve(cache_config.block_size, cache_config.num_blocks,
                                      context=model_config.max_position)
            self.evictor = Evictor(budget, self.manager,
                                   mass_norm=model_config.num_layers * model_config.num_heads)
            self.shifter = ContextShift(self.manager, self.cache, rope_inv_freq(model_config),
                                        model_config.max_position)
        self.exact_window = None
        if exact_window_tokens:
            assert eviction is None, "an exact window needs cache indices = positions"
            # forks (n > 1, beams) run past max_num_seqs: room for them before taking rings
            self.exact_window = ExactWindow(model_config.num_layers, model_config.num_kv_heads,
                                            model_config.head_dim, exact_window_tokens,
                                            device, max_slots=4 * max_num_seqs,
                                            alive=lambda s: s in self.manager.tables)
        salt = cache_salt(cache_config.kv_format, cache_config.block_size)
        self.scheduler = Scheduler(self.manager, max_num_batched_tokens, max_num_seqs,
                                   lambda pairs: self.cache.copy_blocks(pairs),
                                   self.evictor, self.offloader,
                                   salt if prefix_caching else None,
                                   self.exact_window.forget if self.exact_window else None,
                                   self.shifter, self.demoter)
        self.runner = ModelRunner(model, self.cache, self.manager, device, self.evictor,
                                  self.exact_window)
        eos = set(model_config.eos_token_ids)
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        self.eos_ids = frozenset(eos)
        self._next_id = 0
        self.guard = EngineGuard()
        # live requests: root seq_id -> its unfinished sequences; and each one's root
        self.requests: dict[int, list[Sequence]] = {}
        self.request_of: dict[int, int] = {}
        self._aborts: deque[Sequence] = deque()  # abort_soon: done at the next safe point
        self._undo = StepUndo(self)  # what the current step may have to take back

    # ---- requests ----------------------------------------------------------------------
    def new_sequence(self, token_ids: list[int], params: SamplingParams,
                     keep_cache: bool = False) -> Sequence:
        seq = Sequence(self._next_id, list(token_ids), params, keep_cache=keep_cache)
        self._next_id += 1
        return seq

    def validate(self, token_ids: list[int], params: SamplingParams,
                 keep_cache: bool = False) -> None:
        """Raise ValueError if a request of these prompt tokens cannot be queued. Changes
        nothing: callers check every prompt of a batch before they queue any."""
        check_request(self, token_ids, params, keep_cache)

    def add(self, seq: Sequence, params: SamplingParams | None = None) -> None:
        """Queue ``seq`` to generate after its current tokens (its prompt, this turn); it
        starts a live request. Raises ValueError (changing nothing) if it cannot run."""
        with self.hold():
            self.validate(seq.token_ids, params or seq.params, seq.keep_cache)
            if params is not None:
                seq.params = params
            seq.num_prompt, seq.text, seq.finish_reason = seq.num_tokens, "", None
            seq.num_prefix_hit = 0
            p = params or seq.params
            seq.logprobs = [] if p.logprobs is not None and p.beam_width is None else None
            seq.new_text.clear()
            self._start(seq)

    def _start(self, seq: Sequence) -> None:
        p = seq.params
        seq.seed = p.seed if p.seed is not None else request_seed(self.seed, seq.seq_id)
        seq.generator = torch.Generator().manual_seed(seq.seed)
        seq.samples = None
        seq.beam = BeamSearch(seq, p.beam_width) if p.beam_width is not None else None
        if self.tokenizer is not None:
            seq.detok = IncrementalDetokenizer(self.tokenizer, seq.token_ids)
        self.requests[seq.seq_id] = [seq]
        self.request_of[seq.seq_id] = seq.seq_id
        self.scheduler.add(seq)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    @contextmanager
    def hold(self):
        """Own the engine (one thread at a time; Ctrl-C deferred to safe points: guard.py).
        Entering from outside runs the aborts queued by ``abort_soon``."""
        with self.guard.hold():
            if self.guard.depth == 1:
                self._drain_aborts()
            yield

    def drive(self, seq: Sequence, params: SamplingParams | None = None,
              queued: bool = False):
        """Queue ``seq`` (``add``; ``queued``: the caller has) and step until it finishes,
        yielding its text deltas (other requests advance too). The engine is held only
        inside each ``next()``. Closing the generator, an exception, or the generator being
        collected aborts the sequence (``abort_soon``)."""
        try:
            if not queued:
                with self.hold():
                    self.add(seq, params)
            while True:
                while seq.new_text:
                    yield seq.new_text.pop(0)
                if seq.finished:
                    return
                with self.hold():
                    self.step()
        finally:
            if not seq.finished:
                self.abort_soon(seq)

    def abort(self, seq: Sequence) -> None:
        """Stop ``seq``'s request now (its forked samples and beams too); a chat session's
        cache is kept (parked). Only between steps: a holder of the engine calls it."""
        rid = self.request_of.get(seq.seq_id, seq.seq_id)
        for s in [seq] + [s for s in self.requests.get(rid, ()) if s is not seq]:
            if not s.finished:
                if s in self.scheduler.waiting:
                    self.scheduler.waiting.remove(s)
                self.scheduler.finish(s, "abort")
        self._prune_requests()

    def abort_soon(self, seq: Sequence) -> None:
        """Abort ``seq``'s request at once if no call is inside the engine, else at the
        start of the next step. Safe from anywhere: a generator's clean-up that the garbage
        collector runs in the middle of a step, or another thread."""
        self._aborts.append(seq)
        if self.guard.depth == 0:
            try:
                with self.hold():  # runs the queued aborts
                    pass
            except RuntimeError:  # another thread holds it: its next step aborts seq
                pass

    def _drain_aborts(self) -> None:
        while self._aborts:
            seq = self._aborts.popleft()
            if not seq.finished:
                self.abort(seq)

    def _prune_requests(self) -> None:
        """Drop finished sequences from the live requests, and requests with none left."""
        for rid, seqs in list(self.requests.items()):
            live = [s for s in seqs if not s.finished]
            for s in seqs:
                if s.finished:
                    self.request_of.pop(s.seq_id, None)
            if live:
                self.requests[rid] = live
            else:
                del self.requests[rid]

    # ---- the step ----------------------------------------------------------------------
    def step(self) -> list[Sequence]:
        """One step; whatever it raises, the engine is left consistent (``StepUndo``)."""
        self._drain_aborts()
        self.guard.checkpoint()
        self._undo.begin()
        try:
            return self._step()
        except BaseException:
            self._undo.roll_back()
            raise
        finally:
            self._undo.end()
            self._prune_requests()

    def _step(self) -> list[Sequence]:
        batch = self.scheduler.schedule()
        if not batch:
            return []
        self._undo.save(batch.seqs)
        with self.guard.interruptible():  # a Ctrl-C may land in the model run at once
            logits, rows = self.runner.run(batch)
        for seq, n in zip(batch.seqs, batch.num_new, strict=True):
            seq.num_computed += n
            self.scheduler.computed(seq)
        if self.demoter is not None:  # blocks that left their tier move down
            self.demoter.age()
        sampled, rows = self._fork_samples([batch.seqs[i] for i in rows])
        self._beam_steps(sampled, rows, logits)
        sampled, rows = [s for s in sampled if s.beam is None], \
            [r for s, r in zip(sampled, rows, strict=True) if s.beam is None]
        if not sampled:  # only prompt chunks (or beams) ran: nothing to sample
            return []
        logits = logits[torch.tensor(rows, device=logits.device)]  # (N, vocab)
        self._undo.save(sampled)
        tokens = sample(logits, [s.params for s in sampled], [s.generator for s in sampled])
        lps = [None] * len(sampled)
        want = [i for i, s in enumerate(sampled) if s.params.logprobs is not None]
        if want:
            got = token_logprobs(logits[want], [tokens[i] for i in want],
                                 [sampled[i].params.logprobs for i in want])
            for i, lp in zip(want, got, strict=True):
                lps[i] = lp
        for seq, tok, lp in zip(sampled, tokens, lps, strict=True):
            self._commit_token(seq, tok, lp)
        return sampled

    # ---- transactions ------------------------------------------------------------------
    def _commit_token(self, seq: Sequence, token: int, logprob=None) -> None:
        """``_postprocess``, all or nothing: if it raises, ``seq`` is as before (its token
        not yet sampled, which ``StepUndo.roll_back`` then undoes). ``logprob``: the token's
        entry for ``seq.logprobs`` (params.logprobs set)."""
        n, text, deltas = seq.num_tokens, seq.text, len(seq.new_text)
        detok = copy.copy(seq.detok)
        try:
            self._postprocess(seq, token)
        except BaseException:
            del seq.token_ids[n:]
            del seq.new_text[deltas:]
            seq.text, seq.detok = text, detok
            raise
        if seq.logprobs is not None and logprob is not None:
            seq.logprobs.append(logprob)

    def _beam_steps(self, seqs: list[Sequence], rows: list[int], logits: torch.Tensor
                    ) -> None:
        """Hand beams their next-token logits; advance each search all of whose live
        beams have reported."""
        searches = []
        for seq, r in zip(seqs, rows, strict=True):
            if seq.beam is not None:
                seq.beam.observe(seq, logits[r])
                if seq.beam not in searches:
                    searches.append(seq.beam)
        for b in searches:
            if b.ready:
                b.advance(self)

    def _fork_samples(self, seqs: list[Sequence]) -> tuple[list[Sequence], list[int]]:
        """Fork the other samples of each n > 1 request whose prompt was just computed;
        each sample shares the prompt's blocks and samples from the same logits row.
        Returns the sequences to sample and their logits rows."""
        out, rows = [], []
        for i, seq in enumerate(seqs):
            out.append(seq)
            rows.append(i)
            if seq.params.n > 1 and seq.samples is None and seq.sample_index == 0:
                seq.samples = [seq]
                for j in range(1, seq.params.n):
                    child = self.fork(seq)
                    child.sample_index = j
                    child.generator = torch.Generator().manual_seed(seq.seed + j)
                    child.seed = seq.seed + j
                    seq.samples.append(child)
                    out.append(child)
                    rows.append(i)
        return out, rows

    def fork(self, parent: Sequence) -> Sequence:
        """A running copy of ``parent`` that shares its blocks (copy-on-write on its first
        write into the shared partial block) and, with eviction, its block scores."""
        child = copy.copy(parent)
        child.seq_id, self._next_id = self._next_id, self._next_id + 1
        child.token_ids = list(parent.token_ids)
        child.block_hashes, child.hashed_ids = list(parent.block_hashes), \
            list(parent.hashed_ids)
        child.new_text, child.samples = [], None
        child.logprobs = None if parent.logprobs is None else list(parent.logprobs)
        child.detok = copy.copy(parent.detok)
        rid = self.request_of.get(parent.seq_id, parent.seq_id)
        self.request_of[child.seq_id] = rid
        self.requests.setdefault(rid, []).append(child)
        if parent.seq_id in self.manager.tables and not self.manager.is_swapped(
                parent.seq_id):
            self.manager.fork(parent.seq_id, child.seq_id)
            if self.evictor is not None and parent.seq_id in self.evictor.scores:
                self.evictor.scores[child.seq_id] = self.evictor.scores[parent.seq_id].clone()
            if self.exact_window is not None:
                self.exact_window.fork(parent.seq_id, child.seq_id)
            child.status = Status.RUNNING
            self.scheduler.running.append(child)
        else:  # the parent has no resident blocks: the child recomputes (prefix cache hits)
            child.num_computed = child.num_evicted = 0
            child.status = Status.WAITING
            self.scheduler.waiting.appendleft(child)
        return child

    def _postprocess(self, seq: Sequence, token: int) -> None:
        """Append the token, extend the text, and finish the sequence if it should stop."""
        seq.token_ids.append(token)
        p = seq.params
        reason = None
        if (token in self.eos_ids and not p.ignore_eos) or token in p.stop_token_ids:
            reason = "stop"
        elif seq.detok is not None:
            seq.detok.step(seq.token_ids)
            reason = cut_at_stop_string(seq)
        if reason is None and seq.num_outputs >= p.max_tokens:
            reason = "length"
        elif reason is None and self.context_full(seq):
            reason = "context"
        if reason is not None and seq.detok is not None and not seq.detok.text_cut:
            seq.detok.flush(seq.token_ids)
            cut_at_stop_string(seq)
        emit_text(seq, final=reason is not None)
        if reason is not None:
            self.scheduler.finish(seq, reason)

    def context_full(self, seq: Sequence) -> bool:
        """Whether ``seq`` has reached the model's context and cannot take another token.
        Never with eviction: the cache shifts its positions (``context_shift.py``)."""
        return self.evictor is None and seq.num_tokens >= self.model_config.max_position

    # ---- invariants --------------------------------------------------------------------
    def check_integrity(self) -> None:
        """Assert that the engine is consistent between calls (``integrity.check_engine``)."""
        check_engine(self)

    # ---- accounting --------------------------------------------------------------------
    def kv_stats(self) -> dict:
        return kv_stats(self)
