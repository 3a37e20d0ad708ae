"""Probe results kept on disk, one JSON file per (checkpoint, EdgeKV version, calibration,
candidates, block size, compute dtype), in the user's cache directory."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .probe import ProbeResult


def cache_dir() -> Path:
    """$EDGEKV_AUTO_DIR if set, else the user cache directory's edgekv/auto."""
    if os.environ.get("EDGEKV_AUTO_DIR"):
        return Path(os.environ["EDGEKV_AUTO_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "edgekv" / "auto"


def probe_key(**facts) -> str:
    """A hash of everything the measurement depends on."""
    text = json.dumps(facts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def load(key: str) -> ProbeResult | None:
    """The stored result, or None (missing, unreadable or malformed: probe again)."""
    try:
        return ProbeResult.from_json(json.loads((cache_dir() / f"{key}.json").read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def save(key: str, result: ProbeResult) -> None:
    """Write atomically; a read-only cache directory only costs the next load a probe."""
    d = cache_dir()
    try:
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f".{key}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(result.to_json()))
        os.replace(tmp, d / f"{key}.json")
    except OSError:
        pass
