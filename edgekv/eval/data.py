"""The text under test: read it, tokenize it, cut it into windows and prompts.

Window convention (the same for EdgeKV and for transformers, so the numbers compare):

    window k feeds     ids[b : b + W]          (W input tokens, b = k * stride)
    and predicts       ids[b + 1 : b + W + 1]  (W targets)
    scored targets     all W in window 0; the last ``stride`` of them afterwards, so each
                       target is scored once, with at least W - stride tokens of context

Only whole windows are used: the text must hold at least W + 1 tokens.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Window:
    """inputs: W token ids; targets: the W next ids; scored: index of the first scored
    target (0, or W - stride)."""

    inputs: list[int]
    targets: list[int]
    scored: int


def read_documents(path: str | Path) -> list[str]:
    """Documents of a text file (.txt: one document) or a dataset file (.jsonl / .json:
    strings or objects with a "text" field; .csv: a "text" column)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"text file not found: {p}")
    suffix = p.suffix.lower()
    try:
        raw = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read {p} as UTF-8 text: {e}") from None
    if suffix == ".jsonl":
        docs = [_text_of(_json(line, p, n), p)
                for n, line in enumerate(raw.splitlines(), 1) if line.strip()]
    elif suffix == ".json":
        data = _json(raw, p)
        docs = [_text_of(d, p) for d in (data if isinstance(data, list) else [data])]
    elif suffix == ".csv":
        rows = list(csv.DictReader(raw.splitlines()))
        if rows and "text" not in rows[0]:
            raise ValueError(f"{p}: a CSV dataset needs a 'text' column")
        docs = [r["text"] for r in rows]
    else:
        docs = [raw]
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise ValueError(f"{p} holds no text")
    return docs


def _json(text: str, path: Path, line: int | None = None):
    try:
        return json.loads(text)
    except ValueError as e:
        where = f"{path}, line {line}" if line is not None else str(path)
        raise ValueError(f"{where} is not valid JSON: {e}") from None


def _text_of(item, path: Path) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, dict) and isinstance(item.get("text"), str):
        return item["text"]
    raise ValueError(f"{path}: each record must be a string or have a 'text' field")


def tokenize(docs: list[str], tokenizer) -> list[int]:
    """Token ids of all documents, joined by the EOS token when there are several (as
    the demo model's held-out text joins its files). No BOS is added."""
    if tokenizer is None:
        raise ValueError("the model has no tokenizer: eval needs one to read text")
    ids: list[int] = []
    for i, d in enumerate(docs):
        if i and tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
        ids.extend(tokenizer.encode(d, add_special_tokens=False))
    return ids


def make_windows(ids: list[int], window: int, stride: int,
                 max_windows: int | None = None) -> list[Window]:
    """Whole windows over ``ids`` (see the module docstring); raises ValueError when the
    text is shorter than one window."""
    if stride > window:
        raise ValueError(f"stride ({stride}) must not exceed the window ({window})")
    if len(ids) < window + 1:
        raise ValueError(f"the text has {len(ids)} tokens, shorter than one window "
                         f"({window} + 1 tokens); use a longer text or a smaller --window")
    out = []
    for k, b in enumerate(range(0, len(ids) - window, stride)):
        if max_windows is not None and k >= max_windows:
            break
        out.append(Window(ids[b : b + window], ids[b + 1 : b + window + 1],
                          0 if k == 0 else window - stride))
    return out


def make_prompts(ids: list[int], count: int, length: int) -> list[list[int]]:
    """``count`` prompts of ``length`` tokens, evenly spaced over the text."""
    if count == 0:
        return []
    if len(ids) < length:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than one prompt ({length})")
    span = len(ids) - length
    starts = [span * i // max(count - 1, 1) for i in range(count)] if count > 1 else [0]
    return [ids[s : s + length] for s in starts]
