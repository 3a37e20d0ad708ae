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
from collections.abc import Iterator

from .sampling import SamplingParams
from .sequence import Sequence

# Used when the tokenizer has no chat template of its own.
FALLBACK_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}
SENTINEL = "\x00edgekv-reply\x00"


class ChatSession:
    def __init__(self, llm, system: str | None = None):
        if llm.tokenizer is None:
            raise ValueError(f"{llm.model_dir} has no tokenizer: chat needs one")
        self.llm, self.engine = llm, llm.engine
        self.system = system
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []
        self.seq: Sequence | None = None
        self._prompt_text = ""  # the rendered text behind the last prompt's tokens

    # ---- turns -------------------------------------------------------------------------
    def send(self, message: str, params: SamplingParams | None = None) -> str:
        """The model's whole reply to ``message``."""
        return "".join(self.stream(message, params))

    def stream(self, message: str, params: SamplingParams | None = None) -> Iterator[str]:
        """The model's reply to ``message``, as text deltas. Interrupting it (closing the
        generator) keeps what was said so far in the history. If the turn cannot start (a
        message too long for the context), it raises and the conversation is as before."""
        self.messages.append({"role": "user", "content": message})
        seq, prompt_text = self.seq, self._prompt_text
        kept = (seq.token_ids, seq.num_prompt) if seq is not None else None
        try:
            with self.engine.hold():
                params = params or SamplingParams()
                if not params.stop and self.llm.chat_stop:  # the model's own end of a turn
                    params = dataclasses.replace(params, stop=self.llm.chat_stop)
                ids = self._next_turn_ids()
                if ids is None:  # first turn, or a template we cannot extend: full render
                    text = self.render_text(self.messages)
                    ids = self.llm.tokenizer.encode(text, add_special_tokens=False)
                    self._prompt_text = text
                self.engine.validate(ids, params, keep_cache=True)
                if self.seq is None:
                    self.seq = self.engine.new_sequence(ids, params, keep_cache=True)
                else:
                    self._reuse_cache(ids)
        except BaseException:  # the turn never started: its cache holds a prefix of before
            self.messages.pop()
            self.seq, self._prompt_text = seq, prompt_text
            if kept is not None:
                seq.token_ids, seq.num_prompt = kept
            raise
        try:
            yield from self.engine.drive(self.seq, params)
        finally:
            self.messages.append({"role": "assistant", "content": self.seq.text})

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays) and free its blocks."""
        if self.seq is not None:
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
        tok = self.llm.tokenizer
        if getattr(tok, "chat_template", None):
            return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        text = "".join(f"{FALLBACK_ROLES[m['role']]}: {m['content']}\n\n" for m in messages)
        bos = tok.bos_token or ""
        return f"{bos}{text}{FALLBACK_ROLES['assistant']}:"

    def _next_turn_ids(self) -> list[int] | None:
        """Previous prompt + reply tokens as generated + the tokens of what follows them."""
        seq = self.seq
        if seq is None or len(self.messages) < 3 or self.messages[-2]["role"] != "assistant":
            return None
        probe = self.messages[:-2] + [{"role": "assistant", "content": SENTINEL},
                                      self.messages[-1]]
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
        self._prompt_text = before + self.messages[-2]["content"] + after
        return seq.token_ids[: seq.num_prompt] + reply + tok.encode(after,
                                                                    add_special_tokens=False)

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
