"""A sequence's text as it is published: cut at its stop strings, and held back where the
newest characters could still become one."""

from __future__ import annotations

from edgekv.engine.sequence import Sequence


def cut_at_stop_string(seq: Sequence) -> str | None:
    """Cut the decoded text at the first stop string it holds; "stop" if it did."""
    text = seq.detok.text
    hits = [i for s in seq.params.stop if (i := text.find(s)) >= 0]
    if hits:
        seq.detok.text = text[: min(hits)]
        seq.detok.text_cut = True
        return "stop"
    return None


def emit_text(seq: Sequence, final: bool) -> None:
    """Publish new text (``seq.new_text``), holding back a tail that could still become a
    stop string unless the sequence is ``final``."""
    if seq.detok is None:
        return
    text = seq.detok.text
    hold = 0 if final else max((len(s) - 1 for s in seq.params.stop), default=0)
    ready = text[: max(len(seq.text), len(text) - hold)]
    if len(ready) > len(seq.text):
        seq.new_text.append(ready[len(seq.text) :])
        seq.text = ready
