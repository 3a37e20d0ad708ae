"""Chat sessions whose history stays in the KV cache between turns.

A turn's tokens are: the previous turn's prompt tokens, the reply tokens exactly as they
were generated, then the tokens of the text the chat template puts after the reply (its
end marker, the new user message, the cue for the next reply). Only those last tokens are
prefilled. We find that text by rendering the conversation with a sentinel as the last
reply. When a template does not render that way (it rewrites earlier turns, say), the whole
conversation is re-tokenised and the cache is cut back to the longest common prefix.
Either way the cache holds exactly the tokens the model is conditioned on.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator

from edgekv.engine.sampling import SamplingParams, request_seed
from edgekv.engine.sequence import Sequence

log = logging.getLogger("edgekv")

# Used when the tokenizer has no chat template of its own.
FALLBACK_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}
SENTINEL = "\x00edgekv-reply\x00"


def render_chat(tok, messages: list[dict]) -> str:
    """``messages`` ({"role", "content"}: system, user, assistant) as the text the model
    reads, ending with the cue for the assistant's reply: the tokenizer's chat template, or
    "Role: content" paragraphs where it has none."""
    if getattr(tok, "chat_template", None):
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    text = "".join(f"{FALLBACK_ROLES[m['role']]}: {m['content']}\n\n" for m in messages)
    bos = tok.bos_token or ""
    return f"{bos}{text}{FALLBACK_ROLES['assistant']}:"


class ChatSession:
    def __init__(self, llm, system: str | None = None):
        if llm.tokenizer is None:
            raise ValueError(f"{llm.model_dir} has no tokenizer: chat needs one")
        self.llm, self.engine = llm, llm.engine
        self.system = system
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []
        self.seq: Sequence | None = None
        self._prompt_text = ""  # the rendered text behind the last prompt's tokens
        self.prompt_tokens = 0  # tokens the last turn sent through the model (its prefill)
        self.dropped_turns = 0  # oldest turns the last turn dropped to fit the context
        self.total_dropped_turns = 0
        self.turns = 0  # turns started (each seeds its sampling apart)

    # ---- turns -------------------------------------------------------------------------
    def send(self, message: str, params: SamplingParams | None = None) -> str:
        """The model's whole reply to ``message``."""
        return "".join(self.stream(message, params))

    def stream(self, message: str, params: SamplingParams | None = None) -> Iterator[str]:
        """The model's reply to ``message``, as text deltas. Interrupting it (closing the
        generator) keeps what was said so far in the history. If the turn cannot start (a
        message too long for the context), it raises and the conversation is as before."""
        params = params or SamplingParams()
        if not params.stop and self.llm.chat_stop:  # the model's own end of a turn
            params = dataclasses.replace(params, stop=self.llm.chat_stop)
        # each turn draws its own samples (the chat keeps one sequence id), reproducibly:
        # the turn's seed mixes the given seed (or the LLM's) with the turn's number
        base = params.seed if params.seed is not None else self.engine.seed
        params = dataclasses.replace(params, seed=request_seed(base, -1 - self.turns))
        started, seq = False, None
        try:
            with self.engine.hold():  # Ctrl-C waits until the turn is set up whole
                messages, ids, text, dropped = self._turn(message, params)  # changes nothing
                self.engine.validate(ids, params, keep_cache=True)
                self.messages, self._prompt_text = messages, text
                self.dropped_turns = dropped
                self.total_dropped_turns += dropped
                if dropped:
                    log.info("chat: dropped the %d oldest turn(s) to fit the context", dropped)
                if self.seq is None:
                    self.seq = self.engine.new_sequence(ids, params, keep_cache=True)
                else:
                    self._reuse_cache(ids)
                self.prompt_tokens = len(ids) - self.seq.num_computed
                seq = self.seq
                self.engine.add(seq, params)  # with the set-up: a Ctrl-C comes after
                started = True
                self.turns += 1
            yield from self.engine.drive(seq, queued=True)
        finally:
            if started and seq is self.seq:  # (a reset or load in between: not ours now)
                if not seq.finished:  # stopped before drive began
                    self.engine.abort_soon(seq)
                # the reply so far (none if stopped at once) joins the history
                self.messages.append({"role": "assistant", "content": seq.text})

    def context_limit(self) -> int | None:
        """The most tokens the conversation may hold (the model's context, or the KV pool
        if smaller); None with eviction, where the cache keeps a budget and shifts."""
        if self.engine.evictor is not None:
            return None
        cc = self.llm.cache_config
        return min(self.llm.model_config.max_position, cc.num_blocks * cc.block_size)

    def _turn(self, message: str, params: SamplingParams
              ) -> tuple[list[dict], list[int], str, int]:
        """(messages, prompt ids, the text they stand for, turns dropped) of
        the next turn. Changes nothing; raises ValueError if the message alone, after the
        system prompt, leaves no room for a reply."""
        messages = self.messages + [{"role": "user", "content": message}]
        ids, text = self._next_turn_ids(messages) or (None, None)
        if ids is None:  # first turn, or a template we cannot extend: full render
            text = self.render_text(messages)
            ids = self.llm.tokenizer.encode(text, add_special_tokens=False)
        limit = self.context_limit()
        if limit is None:
            return messages, ids, text, 0
        reserve = max(1, min(params.max_tokens, limit // 4))  # room for the reply
        dropped, first = 0, 1 if self.system else 0
        # once turns must go, drop an eighth of the context more, so that the next turns
        # do not each drop one turn and recompute the whole conversation
        target = limit - reserve
        while len(ids) > target - (limit // 8 if dropped else 0):
            if len(messages) - first < 3:  # nothing left to drop but this message
                if len(ids) <= target:
                    break
                raise ValueError(f"this message takes {len(ids)} tokens; with {reserve} kept "
                                 f"for the reply it does not fit the model's context of "
                                 f"{limit} tokens: shorten it, lower max_tokens, or use "
                                 f"eviction")
            del messages[first : first + 2]  # the oldest user message and its reply
            dropped += 1
            text = self.render_text(messages)
            ids = self.llm.tokenizer.encode(text, add_special_tokens=False)
        return messages, ids, text, dropped

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays) and free its blocks; a reply
        still being streamed is stopped first."""
        with self.engine.hold():
            if self.seq is not None:
                if not self.seq.finished:
                    self.engine.abort(self.seq)
                self.engine.scheduler.release(self.seq)
            self.seq = None
            self._prompt_text = ""
            self.messages = self.messages[:1] if self.system else []

    @property
    def num_cached_tokens(self) -> int:
        return self.seq.num_cached if self.seq else 0

    # ---- rendering ---------------------------------------------------------------------
    def render_text(self, messages: list[dict]) -> str:
        """The conversation as text, ending with the cue for the assistant's reply."""
        return render_chat(self.llm.tokenizer, messages)

    def _next_turn_ids(self, messages: list[dict]) -> tuple[list[int], str] | None:
        """Previous prompt + reply tokens as generated + the tokens of what follows them
        (``messages``: the conversation with the new user message last), and the text they
        stand for. Changes nothing."""
        seq = self.seq
        if seq is None or len(messages) < 3 or messages[-2]["role"] != "assistant":
            return None
        probe = messages[:-2] + [{"role": "assistant", "content": SENTINEL}, messages[-1]]
        text = self.render_text(probe)
        before, sep, after = text.partition(SENTINEL)
        # the template may put text (a space, a newline) between the cue and the content:
        # the model wrote its reply after the cue, so the reply tokens stand for both
        if not sep or not before.startswith(self._prompt_text):
            return None
        tok = self.llm.tokenizer
        reply = seq.output_ids
        eos = tok.eos_token
        if reply and reply[-1] in self.engine.eos_ids and eos and after.startswith(eos):
            reply = reply[:-1]  # the template writes the end marker itself
        text = before + messages[-2]["content"] + after
        return seq.token_ids[: seq.num_prompt] + reply + tok.encode(after,
                                                                    add_special_tokens=False), text

    def _reuse_cache(self, ids: list[int]) -> None:
        seq, mgr = self.seq, self.engine.manager
        common = 0
        limit = min(seq.num_computed, len(ids))
        while common < limit and seq.token_ids[common] == ids[common]:
            common += 1
        if common == len(ids):  # the cache must not hold the token we sample from
            common -= 1
        if common < seq.num_computed and seq.num_evicted:
            # an evicted cache cannot be cut back to a prefix: start it over (eviction
            # applies again as the conversation is recomputed)
            self.engine.scheduler.release(seq)
        elif seq.seq_id in mgr.tables and common < mgr.num_tokens(seq.seq_id):
            mgr.truncate(seq.seq_id, common)
            if self.engine.evictor is not None:
                self.engine.evictor.truncated(seq.seq_id)
        seq.num_computed = min(seq.num_computed, common)
        seq.token_ids = list(ids)
