"""Incremental detokenisation: text deltas as tokens arrive, never splitting a character.

Byte-level tokenizers can end a token in the middle of a multi-byte UTF-8 character, which
decodes to U+FFFD. We decode a short window of recent tokens and only emit text once it no
longer ends in U+FFFD, so each delta is whole characters.

Why not ``tokenizers.decoders.DecodeStream``: it serves only fast (Rust) tokenizers, and it
holds an incomplete character back for good where ``flush`` must hand it out at the end;
this class works on any tokenizer's ``decode``, and its state is two offsets, which the
engine copies to undo a failed step and a forked sample inherits.
"""

from __future__ import annotations


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_ids: list[int]):
        self.tok = tokenizer
        # the window starts a few tokens back so that leading-space rules see context
        self.prefix_offset = max(len(prompt_ids) - 5, 0)
        self.read_offset = len(prompt_ids)
        self.text = ""
        self.text_cut = False  # set once a stop string ended the text

    def step(self, all_ids: list[int]) -> str:
        """Given every token so far (prompt + output), return the new text (maybe "")."""
        prefix = self.tok.decode(all_ids[self.prefix_offset : self.read_offset],
                                 skip_special_tokens=True)
        full = self.tok.decode(all_ids[self.prefix_offset :], skip_special_tokens=True)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            delta = full[len(prefix) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(all_ids)
            self.text += delta
            return delta
        return ""

    def flush(self, all_ids: list[int]) -> str:
        """At the end: emit whatever is pending, even an incomplete character (as U+FFFD)."""
        prefix = self.tok.decode(all_ids[self.prefix_offset : self.read_offset],
                                 skip_special_tokens=True)
        full = self.tok.decode(all_ids[self.prefix_offset :], skip_special_tokens=True)
        delta = full[len(prefix) :] if len(full) > len(prefix) else ""
        self.prefix_offset = self.read_offset = len(all_ids)
        self.text += delta
        return delta
