"""Beam search over forked sequences that share their common history's blocks.

One ``BeamSearch`` drives a request's live beams, each a Sequence in the scheduler. A beam
whose last token is computed hands its next-token log-probs to ``observe`` and waits
(the scheduler skips a sequence with nothing to compute). Once every live beam has
reported, ``advance`` ranks all (beam, token) continuations by cumulative log-prob and
keeps the best ``width``:

::

    beams:      A (-1.2)           B (-1.9)          candidates, best first:
    next:       A+x -1.5, A+y -2.0 B+z -2.1          A+x, A+y, B+z ...
    width 2 ->  A+x (A itself), A+y (fork of A: shares A's blocks); B is freed

A kept candidate ending in EOS (or a stop token) becomes a finished hypothesis and its
beam slot is not refilled, so the beam narrows as hypotheses finish; beams that reach
``max_tokens`` finish with "length". Search ends when no beam is live. Hypotheses are
ranked by ``cumulative log-prob / num_tokens ** length_penalty``. With width 1 the best
continuation is the argmax token: beam width 1 is greedy decoding.
"""

from __future__ import annotations

import torch

from edgekv.engine.sequence import Sequence


class BeamSearch:
    def __init__(self, root: Sequence, width: int):
        self.width = width
        self.live: list[Sequence] = [root]
        self.cum: dict[int, float] = {root.seq_id: 0.0}  # seq_id -> cumulative log-prob
        self.pending: dict[int, torch.Tensor] = {}  # seq_id -> (vocab,) log-probs
        self.done: list[tuple[float, list[int], str, float]] = []  # (rank, ids, reason, cum)
        self.finished = False

    def observe(self, seq: Sequence, logits: torch.Tensor) -> None:
        """logits (vocab,) fp32 of ``seq``'s next token."""
        self.pending[seq.seq_id] = torch.log_softmax(logits.float(), -1).cpu()

    @property
    def ready(self) -> bool:
        return not self.finished and all(s.seq_id in self.pending for s in self.live)

    def advance(self, engine) -> None:
        """Choose the next beams; fork, extend and free sequences through ``engine``."""
        cands = []  # (cumulative log-prob, beam index, token), in beam then rank order
        for i, s in enumerate(self.live):
            top = torch.topk(self.pending[s.seq_id], min(2 * self.width,
                                                          engine.model_config.vocab_size))
            for v, t in zip(top.values.tolist(), top.indices.tolist(), strict=True):
                cands.append((self.cum[s.seq_id] + v, i, t))
        cands.sort(key=lambda c: -c[0])  # stable: ties keep beam, then rank, order
        chosen: dict[int, list[tuple[float, int]]] = {}
        for score, i, t in cands[: self.width]:
            s, p = self.live[i], self.live[i].params
            if (t in engine.eos_ids and not p.ignore_eos) or t in p.stop_token_ids:
                self._finish(s.output_ids + [t], "stop", score, p)
            else:
                chosen.setdefault(i, []).append((score, t))
        live = []
        for i, picks in chosen.items():  # fork before any beam changes
            parent = self.live[i]
            beams = [parent] + [engine.fork(parent) for _ in picks[1:]]
            live.extend(zip(beams, picks, strict=True))
        for i, s in enumerate(self.live):
            if i not in chosen:
                _drop(engine, s, "pruned")
        self.pending.clear()
        self.live, self.cum = [], {}
        for s, (score, t) in live:
            s.token_ids.append(t)
            if s.num_outputs >= s.params.max_tokens or engine.context_full(s):
                reason = "length" if s.num_outputs >= s.params.max_tokens else "context"
                self._finish(s.output_ids, reason, score, s.params)
                _drop(engine, s, reason)
            else:
                self.live.append(s)
                self.cum[s.seq_id] = score
        self.finished = not self.live
        if self.finished:
            self.done.sort(key=lambda d: -d[0])
            self._text = engine.tokenizer

    def results(self) -> list[tuple[str, list[int], str, float]]:
        """(text, token_ids, finish_reason, cumulative log-prob), best first."""
        assert self.finished
        tok = self._text
        return [(tok.decode(ids, skip_special_tokens=True) if tok is not None else "", ids,
                 reason, cum) for _, ids, reason, cum in self.done[: self.width]]

    def _finish(self, ids: list[int], reason: str, cum: float, params) -> None:
        self.done.append((cum / max(len(ids), 1) ** params.length_penalty, ids, reason, cum))


def _drop(engine, seq: Sequence, reason: str) -> None:
    """Finish a beam wherever it is queued; its blocks lose this beam's references."""
    if seq in engine.scheduler.waiting:
        engine.scheduler.waiting.remove(seq)
    engine.scheduler.finish(seq, reason)


__all__ = ["BeamSearch"]
