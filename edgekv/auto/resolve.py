"""``kv_format="auto"`` at load: calibration tokens, the probe (or its stored result), the
assignment within the budget."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch

from edgekv.quant import get_format, stores

from . import store
from .assign import Assignment, check_budget, choose
from .probe import REFERENCE, ProbeResult, measure
from .spec import CANDIDATES, DEFAULT_BITS, AutoSpec

# a window of the demo model; on a CPU half that (a 0.5B model's probe: ~1 s a run)
CALIBRATION_TOKENS = {"cuda": 1024, "cpu": 512}
MIN_CALIBRATION_TOKENS = 64


def calibration_ids(tokenizer, model_dir: Path, calibration, max_position: int,
                    device_type: str = "cpu") -> list[int]:
    """Token ids to probe with: ``calibration`` (a text file, or token ids), else the
    model's own heldout.txt, else the bundled demo model's; at most CALIBRATION_TOKENS
    (by device type)."""
    n = min(CALIBRATION_TOKENS.get(device_type, CALIBRATION_TOKENS["cuda"]), max_position)
    if calibration is not None and not isinstance(calibration, (str, Path)):
        ids = [int(t) for t in calibration]
    else:
        from edgekv.eval.data import read_documents
        from edgekv.llm import DEMO_MODEL_DIR

        path = Path(calibration) if calibration is not None else next(
            (p for p in (Path(model_dir) / "heldout.txt", DEMO_MODEL_DIR / "heldout.txt")
             if p.is_file()), None)
        if path is None:
            raise ValueError("kv_format=auto needs a calibration text: give one "
                             "(--calibration FILE)")
        if tokenizer is None:
            raise ValueError("kv_format=auto needs a tokenizer to read the calibration text "
                             "(or calibration token ids)")
        ids = tokenizer.encode("\n\n".join(read_documents(path)))
    if len(ids) < min(MIN_CALIBRATION_TOKENS, n):
        raise ValueError(f"the calibration text has {len(ids)} tokens; kv_format=auto needs "
                         f"at least {min(MIN_CALIBRATION_TOKENS, n)}")
    return ids[:n]


def _progress():
    """A progress bar on stderr (hidden where stderr is not a terminal)."""
    from tqdm.auto import tqdm

    bar = None

    def update(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc="kv_format=auto: probing layers", unit="run",
                       leave=False, disable=None)
        bar.total = total
        bar.n = done
        bar.refresh()
        if done == total:
            bar.close()
    return update


def resolve_auto(model: torch.nn.Module, mc, model_identity: str, ids: list[int],
                 spec: AutoSpec, *, device: torch.device, compute_dtype, block_size: int,
                 budget_bytes: int | None = None,
                 candidates: Sequence[str] = CANDIDATES) -> tuple[Assignment, ProbeResult]:
    """The per-layer formats for ``spec`` (bits per value, else ``budget_bytes`` per token,
    else DEFAULT_BITS), from the probe of ``ids``, stored per model and re-used."""
    from edgekv import __version__

    fmts = tuple(f for f in dict.fromkeys((REFERENCE, *candidates)) if stores(f, mc.head_dim))
    values = 2 * mc.num_layers * mc.num_kv_heads * mc.head_dim  # K and V, per token
    if spec.bits is not None or budget_bytes is None:
        budget_bytes = math.floor((spec.bits or DEFAULT_BITS) * values / 8)
    key = store.probe_key(model=model_identity, version=__version__, formats=fmts,
                          block_size=block_size, dtype=str(compute_dtype), device=device.type,
                          ids=ids)
    layer_bytes = [get_format(f).bytes_per_token(mc.num_kv_heads, mc.head_dim) for f in fmts]
    check_budget(fmts, layer_bytes, mc.num_layers, budget_bytes, values)  # before probing
    result = store.load(key)
    if result is None or result.formats != fmts or len(result.kl) != mc.num_layers or \
            result.age is None:
        result = measure(model, mc.num_layers, mc.num_kv_heads, mc.head_dim, ids, fmts,
                       block_size, device, _progress())
        store.save(key, result)
    return choose(result, layer_bytes, budget_bytes), result


def decide_target(probe: ProbeResult, mc, kv_memory: int, target_context: int,
                  block_size: int, chunk_tokens: int, allow_tiers: bool,
                  quantized: bool = False):
    """``LLM(kv_format="auto", kv_memory=M, target_context=N)``: the budget controller's
    storage for one sequence of N tokens in M bytes (edgekv/plan/controller.py), scored
    by this model's probe: a uniform format, one per layer, or age tiers (``allow_tiers``
    False: not tiers; ``quantized``: no uniform unquantized format, as exact_window needs).
    Returns the Decision; ValueError (one line) if nothing holds N."""
    from edgekv.plan.controller import Controller

    from .quality import QualityModel

    quality = QualityModel.from_probe(probe, "this model's probe")
    ctl = Controller(mc.num_layers, mc.num_kv_heads, mc.head_dim, kv_memory, target_context,
                     1, quality, block_size, chunk_tokens, probe, tiers=allow_tiers,
                     formats=tuple(f for f in probe.formats if not quantized or f != REFERENCE))
    d = ctl.decide()
    if d.needs:
        most = max((c.tokens_per_seq for c in d.candidates), default=0)
        raise ValueError(f"kv_memory of {kv_memory:,} bytes cannot hold target_context="
                         f"{target_context} tokens in any per-layer formats or tiers (at most "
                         f"{most:,}): give more memory, or use eviction")
    return d



def checkpoint_key(model_dir: Path) -> str:
    """The model's identity hash (config and the ends of each shard) and each shard's size
    and modification time: a checkpoint edited in place is probed again."""
    from edgekv.session.io import model_identity

    shards = sorted(model_dir.glob("*.safetensors"))
    stamps = [f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in shards]
    return ";".join([model_identity(model_dir), *stamps])
