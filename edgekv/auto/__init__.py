"""``kv_format="auto"``: one KV format per layer, chosen at load by a probe of what each
layer's format costs the model (probe.py), within a byte budget (choose.py), the probe's
result kept per model on disk (store.py)."""

from .choose import Assignment, choose
from .probe import REFERENCE, ProbeResult, probe
from .resolve import calibration_ids, resolve_auto
from .spec import CANDIDATES, DEFAULT_BITS, AutoSpec, parse_auto

__all__ = ["Assignment", "AutoSpec", "CANDIDATES", "DEFAULT_BITS", "ProbeResult", "REFERENCE",
           "calibration_ids", "choose", "parse_auto", "probe", "resolve_auto"]
