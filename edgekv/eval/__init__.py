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

import lazy_loader

# Imported on first use: ``edgekv eval --help`` loads cli.py alone, not torch.
__getattr__, __dir__, __all__ = lazy_loader.attach(__name__, submod_attrs={
    "config": ["BASELINE", "PEERS", "EvalConfig"],
    "report": ["COLUMNS"],
    "runner": ["run"],
})
