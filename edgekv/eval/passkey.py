"""Passkey retrieval: a number hidden at several depths of filler text; can the model
repeat it? Accuracy by context length and by depth of the key.

    [intro] [filler ...] [needle: "The pass key is 48213. Remember it."] [filler ...]
    [question: "What is the pass key? The pass key is"]  -> greedy tokens must contain it

Meaningful on real long-context models; a small model (the demo's 1024 tokens) cannot do
it, so the runner skips it below ``EvalConfig.passkey_min_context`` and says so.
"""

from __future__ import annotations

import random

INTRO = ("There is an important piece of information hidden inside a lot of irrelevant "
         "text. Find it and memorize it.")
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and " \
         "back again."
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"
ANSWER_TOKENS = 8
MAX_DEFAULT_LENGTH = 16384  # longest default prompt: longer ones are opt-in (lengths=...)


def default_lengths(max_position: int) -> list[int]:
    """A quarter, half and nearly all of the context (capped), leaving room to answer."""
    top = min(max_position, MAX_DEFAULT_LENGTH) - ANSWER_TOKENS - 8
    return sorted({top // 4, top // 2, top})


def fixed_length(tokenizer) -> int:
    """Tokens of the parts every prompt has (intro, needle, question): lengths must exceed
    it by at least one filler sentence."""
    enc = lambda s: len(tokenizer.encode(s, add_special_tokens=False))  # noqa: E731
    return enc(INTRO) + enc(NEEDLE.format(key=99999)) + enc(QUESTION) + enc(FILLER)


def build_prompt(tokenizer, length: int, depth: float, key: int) -> list[int]:
    """Token ids of about ``length`` tokens (never more) with the needle at ``depth``
    (0: right after the intro, 1: right before the question)."""
    enc = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    intro, filler = enc(INTRO), enc(FILLER)
    needle, question = enc(NEEDLE.format(key=key)), enc(QUESTION)
    room = length - len(intro) - len(needle) - len(question)
    if room < 0:
        raise ValueError(f"passkey length {length} is too short for the prompt's fixed "
                         f"parts ({length - room} tokens)")
    reps = room // len(filler)
    before = round(reps * depth)
    hay = filler * reps
    cut = before * len(filler)
    return intro + hay[:cut] + needle + hay[cut:] + question


def run_passkey(subject, tokenizer, lengths: list[int], depths: tuple[float, ...],
                trials: int, seed: int, on_length=None) -> dict:
    """Accuracy of ``subject`` by length and depth. Keys are drawn from ``seed``, so every
    configuration sees the same prompts. Returns {"lengths", "depths", "trials",
    "acc": {length: {depth: fraction}}, "mean": overall fraction}."""
    rng = random.Random(seed)
    acc: dict[str, dict[str, float]] = {}
    total = hits_all = 0
    for length in lengths:
        prompts, keys = [], []
        for d in depths:
            for _ in range(trials):
                key = rng.randint(10000, 99999)
                prompts.append(build_prompt(tokenizer, length, d, key))
                keys.append((d, key))
        outs = subject.greedy(prompts, ANSWER_TOKENS)
        row: dict[str, float] = {}
        for d in depths:
            hits = [str(k) in tokenizer.decode(o) for (dd, k), o in zip(keys, outs, strict=True)
                    if dd == d]
            row[f"{d:g}"] = sum(hits) / len(hits)
            hits_all += sum(hits)
            total += len(hits)
        acc[str(length)] = row
        if on_length is not None:
            on_length(length)
    return {"lengths": list(lengths), "depths": list(depths), "trials": trials, "acc": acc,
            "mean": hits_all / total if total else None}
