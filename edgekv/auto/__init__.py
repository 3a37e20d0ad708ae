"""``kv_format="auto"``: one KV format per layer, chosen at load by a probe of what each
layer's format costs the model (probe.py), within a byte budget (assign.py), the probe's
result kept per model on disk (store.py). ``spec.py`` (the "auto:BITS" syntax) imports no
torch, so the command line parses ``--kv`` without it; the rest loads on first use."""

from __future__ import annotations

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach(__name__, submod_attrs={
    "assign": ["Assignment", "BudgetTooSmall", "check_budget", "choose"],
    "probe": ["REFERENCE", "ProbeResult", "measure"],
    "resolve": ["calibration_ids", "resolve_auto"],
    "spec": ["CANDIDATES", "DEFAULT_BITS", "AutoSpec", "parse_auto"],
})
