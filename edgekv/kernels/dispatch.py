"""The attention and KV-write entry points the runtime calls: Triton kernels or torch.

    paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, fmt, ...)
    paged_prefill_attention(q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, fmt, ...)
    paged_prefill_block_mass(q, k_cache, block_tables, seq_lens, cu_seqlens_q, fmt, ...)
    write_kv(k_store, v_store, k, v, slots, fmt)

Routing (``auto``): CUDA tensors go to the fused Triton kernels, CPU tensors to the torch
path (cpu_decode.py, cpu_prefill.py, cpu_write.py: plain torch over the blocks as stored,
planned once per step by cpu_plan.py). ``reference`` runs the oracle (reference.py), the
simple implementation every other path is tested against, never the product path.
``set_backend("triton" | "torch" | "reference")`` or the environment variable
``EDGEKV_ATTENTION_BACKEND`` forces one; ``set_backend`` wins, and is undone by
``set_backend(None)``. Forcing ``triton`` on CPU tensors runs the kernels in
Triton's interpreter, which must be switched on (``TRITON_INTERPRET=1``) before the kernel
modules are first imported; that is how CI tests them.

Fallback: under ``auto``, a CUDA call the kernels cannot take (a format or head_dim they do
not support, Triton missing, a kernel that fails to compile) runs the torch path and logs
one warning per reason (logging, logger ``edgekv.kernels.dispatch``). The torch path needs
no compiler and no CPU feature, so it has no fallback of its own. Under ``triton`` the
same case raises ValueError. Nothing falls back silently.

The kernel modules are imported lazily, on first use, so that importing edgekv does not
import Triton on machines that never use it.
"""

from __future__ import annotations

import importlib
import logging
import os

import torch

from edgekv.quant import KVFormat, QuantizedKV, get_format

from .cpu_decode import paged_decode_attention_cpu
from .cpu_plan import StepPlan
from .cpu_prefill import paged_prefill_attention_cpu, prefill_block_mass_cpu
from .cpu_write import write_kv_cpu
from .reference import (
    paged_decode_attention_ref,
    paged_prefill_attention_ref,
    prefill_block_mass_ref,
    write_kv_ref,
)
from .window_attention import ExactWindowKV, exact_decode_attention, merge_attention

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "triton", "torch", "reference")
_NO_EXACT = "the prefill kernel does not read the exact window (exact_window) yet"
_NO_EXACT_MASS = "block mass with the exact window (exact_window)"
ENV_VAR = "EDGEKV_ATTENTION_BACKEND"
_forced: str | None = None
_warned: set[str] = set()


def set_backend(name: str | None) -> None:
    """Force ``"triton"``, ``"torch"`` or ``"reference"`` (or ``"auto"``) for every later
    call; None undoes it."""
    global _forced
    if name is not None and name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {BACKENDS}")
    _forced = name


def get_backend() -> str:
    """The backend in force: set_backend's, else $EDGEKV_ATTENTION_BACKEND's, else "auto"."""
    if _forced is not None:
        return _forced
    name = os.environ.get(ENV_VAR, "").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={name!r} is not one of {BACKENDS}")
    return name


def _kernels(module: str):
    return importlib.import_module(f"{__package__}.{module}")


def _triton_problem(device: torch.device, fmt: KVFormat, head_dim: int) -> str | None:
    """Why the Triton kernels cannot run this call, or None if they can."""
    try:
        tiles = _kernels("kv_tiles")
    except ImportError as e:  # no triton on this platform
        return f"Triton is not available ({e})"
    try:
        tiles.kernel_format(fmt, head_dim)
    except tiles.UnsupportedFormat as e:
        return str(e)
    if device.type != "cuda":
        kernel = _kernels("paged_decode")._paged_decode_kernel
        if type(kernel).__name__ != "InterpretedFunction":
            return ("CPU tensors need Triton's interpreter: set TRITON_INTERPRET=1 before "
                    "edgekv's kernel modules are first imported")
    return None


def _warn_once(reason: str, what: str = "Triton kernels unavailable, using the torch path"
               ) -> None:
    if reason not in _warned:
        _warned.add(reason)
        logger.warning("edgekv: %s: %s", what, reason)


def _use_triton(device: torch.device, fmt: KVFormat, head_dim: int,
                unsupported: str | None = None) -> bool:
    """Route one call: True for the Triton kernels. Raises or warns as the module says.
    ``unsupported``: an option of this call the kernel does not take (why it cannot run)."""
    backend = get_backend()
    if backend in ("torch", "reference") or (backend == "auto" and device.type != "cuda"):
        return False
    problem = unsupported or _triton_problem(device, fmt, head_dim)
    if problem is None:
        return True
    if backend == "triton":
        raise ValueError(f"attention backend 'triton' cannot run this call: {problem}")
    _warn_once(problem)
    return False


def _compile_errors() -> tuple[type[BaseException], ...]:
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources
    return CompilationError, OutOfResources


def _run(kernel, fallback, reason: str):
    """Run a Triton launcher; under "auto", a compile failure falls back with a warning."""
    if get_backend() == "triton":
        return kernel()
    try:
        return kernel()
    except _compile_errors() as e:
        _warn_once(f"{reason}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        return fallback()


def paged_decode_attention(
    q: torch.Tensor, k_cache: QuantizedKV, v_cache: QuantizedKV, block_tables: torch.Tensor,
    seq_lens: torch.Tensor, fmt: KVFormat | str, sm_scale: float | None = None, *,
    return_block_mass: bool = False, exact: ExactWindowKV | None = None,
    plan: StepPlan | None = None, q_storage_basis: bool = False, return_lse: bool = False,
    **kernel_options,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Decode attention, (S, Hq, D) -> (S, Hq, D); see paged_decode.py for the contract and
    for ``kernel_options`` (num_splits, block_n, ...; the torch path ignores them).
    With ``return_block_mass`` also returns (S, max_blocks) fp32 block mass (rows sum to Hq).
    ``exact``: each sequence's newest tokens read exact (window_attention.py). ``plan``: this
    step's plan (cpu_plan.plan_step, with ``exact``'s counts), read by the torch path.
    ``q_storage_basis``: q is fp32 in the format's storage basis (rotated with k and v in
    one matmul); the output is in the original basis either way. ``return_lse``: also the
    (S, Hq) fp32 log2-sum-exp, to merge with attention over other keys (age tiers; not
    with ``exact`` or block mass; the reference has none: the torch path runs).
    """
    fmt = get_format(fmt)
    if return_lse:
        assert exact is None and not return_block_mass and not q_storage_basis
        if not _use_triton(q.device, fmt, q.shape[-1]):
            return paged_decode_attention_cpu(q, k_cache, v_cache, block_tables, seq_lens,
                                              fmt, sm_scale, return_lse=True)
        run = _kernels("paged_decode").paged_decode_attention
        return _run(lambda: run(q, k_cache, v_cache, block_tables, seq_lens, fmt, sm_scale,
                                return_lse=True, **kernel_options),
                    lambda: paged_decode_attention_cpu(q, k_cache, v_cache, block_tables,
                                                       seq_lens, fmt, sm_scale,
                                                       return_lse=True),
                    f"decode kernel for {fmt.name}")
    q_storage = q if q_storage_basis else None
    if q_storage_basis and (exact is not None or get_backend() == "reference" or _use_triton(
            q.device, fmt, q.shape[-1],
            _NO_EXACT_MASS if exact is not None and return_block_mass else None)):
        q = fmt.from_storage_basis(q)  # the paths that take q in the original basis

    def torch_path():
        if get_backend() == "reference":
            return paged_decode_attention_ref(q, k_cache, v_cache, block_tables, seq_lens,
                                              fmt, sm_scale,
                                              return_block_mass=return_block_mass,
                                              exact=exact)
        return paged_decode_attention_cpu(q, k_cache, v_cache, block_tables, seq_lens, fmt,
                                          sm_scale, return_block_mass=return_block_mass,
                                          exact=exact, q_storage=q_storage,
                                          buckets=None if plan is None else plan.buckets)

    if not _use_triton(q.device, fmt, q.shape[-1],
                       _NO_EXACT_MASS if exact is not None and return_block_mass else None):
        return torch_path()
    run = _kernels("paged_decode").paged_decode_attention
    if exact is not None:  # the blocks up to each exact window in the kernel, the window here
        def with_window():
            scale = q.shape[-1] ** -0.5 if sm_scale is None else sm_scale
            blocks = seq_lens - exact.num_exact(seq_lens).to(seq_lens)
            o1, l1 = run(q, k_cache, v_cache, block_tables, blocks, fmt, sm_scale,
                         return_lse=True, **kernel_options)
            o2, l2 = exact_decode_attention(q, exact, seq_lens, scale)
            return merge_attention(o1, l1, o2, l2).to(q.dtype)

        return _run(with_window, torch_path, f"decode kernel for {fmt.name}")
    return _run(lambda: run(q, k_cache, v_cache, block_tables, seq_lens, fmt, sm_scale,
                            return_block_mass=return_block_mass, **kernel_options),
                torch_path, f"decode kernel for {fmt.name}")


def paged_prefill_attention(
    q: torch.Tensor, k_cache: QuantizedKV, v_cache: QuantizedKV, block_tables: torch.Tensor,
    seq_lens: torch.Tensor, cu_seqlens_q: torch.Tensor, fmt: KVFormat | str,
    sm_scale: float | None = None, exact: ExactWindowKV | None = None, **kernel_options,
) -> torch.Tensor:
    """Causal prefill / append attention, (T, Hq, D) -> (T, Hq, D); see paged_prefill.py.
    ``exact``: each sequence's newest tokens read exact (window_attention.py)."""
    fmt = get_format(fmt)

    def torch_path():
        run = paged_prefill_attention_ref if get_backend() == "reference" \
            else paged_prefill_attention_cpu
        return run(q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, fmt, sm_scale,
                   exact=exact)

    if not _use_triton(q.device, fmt, q.shape[-1], _NO_EXACT if exact is not None else None):
        return torch_path()
    run = _kernels("paged_prefill").paged_prefill_attention
    return _run(lambda: run(q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, fmt,
                            sm_scale, **kernel_options),
                torch_path, f"prefill kernel for {fmt.name}")


def paged_prefill_block_mass(
    q: torch.Tensor, k_cache: QuantizedKV, block_tables: torch.Tensor, seq_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor, fmt: KVFormat | str, sm_scale: float | None = None,
    last_n: int = 32,
) -> torch.Tensor:
    """(S, max_blocks) block mass of each sequence's last ``last_n`` new queries (see
    reference.prefill_block_mass_ref). The tiled torch path on every device (the oracle under
    ``reference``): it scores a small observation window once per prefill chunk."""
    run = prefill_block_mass_ref if get_backend() == "reference" else prefill_block_mass_cpu
    return run(q, k_cache, block_tables, seq_lens, cu_seqlens_q, get_format(fmt), sm_scale,
               last_n)


def write_kv(k_store: QuantizedKV, v_store: QuantizedKV, k: torch.Tensor, v: torch.Tensor,
             slots: torch.Tensor, fmt: KVFormat | str, rows: torch.Tensor | None = None
             ) -> None:
    """Quantize new K/V (num_tokens, Hkv, D) into one layer's stores at flat ``slots``
    (``rows``: their storage rows planned for the step, cpu_plan.slot_rows).

    Mutates the stores at those slots only (codes, scales, zeros). Same values as
    ``fmt.quantize`` (the Triton kernel's codes may differ by one where a value sits on a
    rounding boundary and the devices' arithmetic differs; a codebook group may take
    another scale candidate where two nearly tie: quant_write._codebook_codes).
    """
    fmt = get_format(fmt)

    def torch_path():
        if get_backend() == "reference":
            return write_kv_ref(k_store, v_store, k, v, slots, fmt)
        if not _contiguous(k_store, v_store):
            _warn_once("non-contiguous KV stores", "writing with the reference's indexed "
                       "scatter")
            return write_kv_ref(k_store, v_store, k, v, slots, fmt)
        write_kv_cpu(k_store, v_store, k, v, slots, fmt, rows)

    if not _use_triton(k.device, fmt, k.shape[-1]):
        return torch_path()
    run = _kernels("quant_write").write_kv_triton
    return _run(lambda: run(k_store, v_store, k, v, slots, fmt), torch_path,
                f"write kernel for {fmt.name}")


def _contiguous(*stores: QuantizedKV) -> bool:
    return all(t is None or t.is_contiguous() for s in stores for t in (s.data, s.scale, s.zero))
