"""What ``LLM.generate`` returns: a request's completions, and how a finished sequence
(its samples or beams) becomes them."""

from __future__ import annotations

from dataclasses import dataclass, field

from edgekv.engine.sequence import Sequence


@dataclass
class CompletionOutput:
    """One sample (``n`` > 1) or one beam (``beam_width``) of a request."""

    text: str
    token_ids: list[int]
    # "stop" (eos, stop string or token), "length" (max_tokens), "context" (the model's
    # context or the whole KV pool is full: no room for another token), "abort"
    finish_reason: str
    cumulative_logprob: float | None = None  # beam search only
    # SamplingParams.logprobs set: per token (its log-prob, [(token, log-prob)] most likely)
    logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None


@dataclass
class RequestOutput:
    """A request's result. ``outputs`` holds its completions: ``n`` samples in sample
    order, or ``beam_width`` beams best first (one for a plain request). ``text``,
    ``token_ids`` and ``finish_reason`` are those of ``outputs[0]``."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" | "length" | "context" | "abort" (see CompletionOutput)
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)


def request_done(seq: Sequence) -> bool:
    if seq.beam is not None:
        return seq.beam.finished
    return all(s.finished for s in seq.samples or [seq])


def request_output(seq: Sequence) -> RequestOutput:
    if seq.beam is not None:
        outs = [CompletionOutput(*o) for o in seq.beam.results()]
    else:
        outs = [CompletionOutput(s.text, s.output_ids, s.finish_reason,
                                 logprobs=None if s.logprobs is None else list(s.logprobs))
                for s in seq.samples or [seq]]
    best = outs[0]
    return RequestOutput(best.text, best.token_ids, best.finish_reason,
                         seq.token_ids[: seq.num_prompt], outs)
