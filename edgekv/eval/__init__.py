"""``edgekv eval``: what each KV format and eviction policy costs in accuracy.

    config.py    EvalConfig: formats, policies and budgets, text, windows, peers
    data.py      the text: documents -> token ids -> windows and prompts
    metrics.py   perplexity, KL / top-1, greedy agreement, relative error (pure functions)
    subjects.py  one configuration under test: EdgeKVSubject (an edgekv.LLM)
    peers.py     transformers' caches on the same model: DynamicCache, quanto, hqq
    layers.py    per-layer attention-output error, each layer fed the same input
    passkey.py   passkey retrieval by length and depth (long-context models)
    runner.py    run(): the baseline first, then every configuration, one row each
    report.py    console table, JSON / CSV / Markdown
    plot.py      --plot (matplotlib, optional)
    cli.py       the `edgekv eval` command

    from edgekv.eval import run
    rows = run(formats=("fp16", "int8", "int4"))   # the demo model on its held-out text
"""

from __future__ import annotations

import importlib

# Imported on first use (PEP 562): ``edgekv eval --help`` loads cli.py alone, not torch.
_LAZY = {"BASELINE": ".config", "PEERS": ".config", "EvalConfig": ".config",
         "COLUMNS": ".report", "run": ".runner"}

__all__ = ["BASELINE", "COLUMNS", "PEERS", "EvalConfig", "run"]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'edgekv.eval' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value
