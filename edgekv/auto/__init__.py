"""``kv_format="auto"``: one KV format per layer, chosen at load by a probe of what each
layer's format costs the model (probe.py), within a byte budget (assign.py), the probe's
result kept per model on disk (store.py). ``spec.py`` (the "auto:BITS" syntax) imports no
torch, so the command line parses ``--kv`` without it; the rest loads on first use."""

from __future__ import annotations

import importlib

_LAZY = {
    "Assignment": ".assign", "choose": ".assign", "check_budget": ".assign",
    "BudgetTooSmall": ".assign",
    "REFERENCE": ".probe", "ProbeResult": ".probe", "measure": ".probe",
    "calibration_ids": ".resolve", "resolve_auto": ".resolve",
    "CANDIDATES": ".spec", "DEFAULT_BITS": ".spec", "AutoSpec": ".spec",
    "parse_auto": ".spec",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'edgekv.auto' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value
