"""A sequence: its tokens, how many are in the KV cache, and how it samples and stops."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from edgekv.engine.detokenizer import IncrementalDetokenizer
from edgekv.engine.sampling import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One request's state. ``token_ids`` holds the prompt then the outputs.

    ``num_computed`` tokens have been through the model; the rest are computed by the next
    steps (a prompt chunk, or the last sampled token). ``num_evicted`` of the computed
    tokens were dropped from the cache by an eviction policy, so the cache holds
    ``num_cached`` of them and token position p (p >= the evicted ones) sits at cache
    index ``p - num_evicted``. ``num_prompt`` marks where this
    request's outputs begin (for a chat session, where the current turn's reply begins).
    """

    seq_id: int
    token_ids: list[int]
    params: SamplingParams
    num_prompt: int = 0
    num_computed: int = 0
    num_evicted: int = 0
    num_prefix_hit: int = 0  # prompt tokens found in the prefix cache (not computed)
    status: Status = Status.WAITING
    finish_reason: str | None = None
    generator: torch.Generator | None = None
    seed: int = 0  # what seeded ``generator`` (sample j of an n > 1 request: seed + j)
    detok: IncrementalDetokenizer | None = None
    text: str = ""  # output text so far (stop strings removed)
    keep_cache: bool = False  # a chat session keeps its blocks after finishing a turn
    new_text: list[str] = field(default_factory=list)  # deltas not yet taken by a stream
    # prefix-cache chain hashes of the full blocks of hashed_ids (a copy of the tokens they
    # cover: a chat turn may rewrite token_ids, and stale hashes are then cut back)
    block_hashes: list[bytes] = field(default_factory=list)
    hashed_ids: list[int] = field(default_factory=list)
    # n > 1: the request's samples, this sequence (sample 0) first; set on sample 0 only
    samples: list[Sequence] | None = None
    sample_index: int = 0  # which sample of its request this is (forks are 1..n-1)
    beam: object | None = None  # beam_search.BeamSearch driving this sequence, if any
    # params.logprobs set: per output token (its log-prob, [(token, log-prob)] most likely)
    logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_cached(self) -> int:
        return self.num_computed - self.num_evicted

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt :]

    @property
    def num_outputs(self) -> int:
        return len(self.token_ids) - self.num_prompt

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED
