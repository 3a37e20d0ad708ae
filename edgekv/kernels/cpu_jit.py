"""The compiled CPU decode path: set-up and calls of the numba kernels (cpu_jit_loops.py).

The plain-torch path (cpu_decode.py) gathers a layer's whole batch history into fp32 before
it dots anything, and a decode layer dispatches ~40 small ops around it; at long context
the copy, and at batch 1 the dispatch, is what a step costs. The compiled kernels read the
codes where they lie (cpu_jit_loops.py says how) and do a decode layer's RoPE, rotation,
quantize-and-write and attention in one call.

Work items are (sequence, KV head, split): a long history is cut into ``splits`` ranges of
blocks that run on different threads (flash-decoding) and merge by their softmax maxima and
sums; with one thread, or enough sequences, there is one split.

numba is imported on first use, not with edgekv, and compiles each kernel once (a few
seconds, cached on disk where numba can write its cache). Where numba is missing or fails
to compile, ``available()`` is False, one warning is logged and callers run the plain-torch
path. Why numba (measured, see README "Kernels"): it installs as wheels on every platform
torch does, needs no C compiler at run time, and its loops read int8 / int4 codes 3-10x
faster than the torch path's gather-and-convert.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import threading
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

KIND_INT8, KIND_INT4, KIND_BYTE_LUT, KIND_FP16, KIND_CODEBOOK = range(5)


@functools.lru_cache(maxsize=1)
def _jit():
    """(numba, the kernels' modules), or None when numba cannot be used."""
    try:
        import numba

        _cache_dir(numba)
        from . import cpu_jit_layer, cpu_jit_loops, cpu_jit_rows
    except Exception as e:  # noqa: BLE001 - missing or broken: the torch path needs neither
        logger.warning("numba is unavailable (%s): CPU decode runs the plain torch path, "
                       "which reads quantized KV more slowly", e)
        return None
    # GNU OpenMP does not survive fork(): a forked child runs the torch path
    os.register_at_fork(after_in_child=lambda: _disabled.add(True))
    return numba, cpu_jit_loops, cpu_jit_rows, cpu_jit_layer


def _cache_dir(numba) -> None:
    """Compiled kernels are cached under a directory named after the kernels' sources.
    numba checks only the caller's own file for changes, and ``cpu_jit_layer.layer`` calls
    into ``cpu_jit_loops``: an edit there would leave a stale cached layer. (Under the
    user's NUMBA_CACHE_DIR if set, else the user cache directory.)"""
    here = Path(__file__).parent
    digest = hashlib.sha256()
    for name in sorted(here.glob("cpu_jit*.py")):
        digest.update(name.read_bytes())
    base = os.environ.get("NUMBA_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "edgekv")
    numba.config.CACHE_DIR = os.path.join(base, f"numba-{digest.hexdigest()[:16]}")
    if not os.path.isdir(numba.config.CACHE_DIR):  # the first decode step will compile
        logger.warning("compiling EdgeKV's CPU kernels for this machine, once: the first "
                       "reply takes up to a few minutes more (cached in %s)",
                       numba.config.CACHE_DIR)


def available() -> bool:
    """numba imported and no kernel has failed to compile."""
    return not _disabled and _jit() is not None


@functools.lru_cache(maxsize=1)
def half_table() -> np.ndarray:
    """(65536,) fp32: the value of every fp16 bit pattern."""
    return np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(
        np.float32)


@functools.lru_cache(maxsize=4)
def byte_table(dtype: torch.dtype) -> np.ndarray:
    """(256,) fp32: the value of every byte of an fp8 dtype."""
    return torch.arange(256, dtype=torch.int32).to(torch.uint8).view(dtype).float().numpy()


def num_splits(num_items: int, num_blocks: int, threads: int) -> int:
    """Splits per (sequence, KV head) so that every thread has work, each at least 16
    blocks long; 1 with one thread."""
    if threads <= 1 or num_items >= threads:
        return 1
    return max(1, min(-(-2 * threads // num_items), num_blocks // 16))


_attention_threads: list[int | None] = [None]


def set_attention_threads(n: int | None) -> None:
    """Threads for the multi-sequence decode attention (``decode``, ``decode_layer``);
    None: torch's count. ``edgekv serve`` gives it every CPU and torch one less: the
    attention of a batch is one fork and join per layer over many independent items, long
    enough that a CPU shared with the HTTP side still pays, where the small matrix
    products and the batch-1 layer (a join every ~0.5 ms) stall on it (measured on 2 CPUs,
    demo model, 16 streaming clients: 3.0-3.25x one-at-a-time against 2.6-2.75x; one
    client unchanged at ~390 tok/s, and ~200 tok/s had the batch-1 layer 2 threads)."""
    _attention_threads[0] = n


def attention_threads() -> int:
    """The thread count of the multi-sequence decode attention now."""
    return _attention_threads[0] or torch.get_num_threads()


def _parallel(kernel, threads: int):
    """``kernel`` with numba's thread count set to torch's (``threads``)."""
    numba = _jit()[0]
    threads = max(1, min(threads, numba.config.NUMBA_NUM_THREADS))
    if getattr(_numba_threads, "n", 0) != threads:  # numba's count is per calling thread
        torch_threads = torch.get_num_threads()
        numba.set_num_threads(threads)
        if torch.get_num_threads() != torch_threads:  # numba's OpenMP pool, started on
            torch.set_num_threads(torch_threads)      # first use, resets torch's count
        _numba_threads.n = threads
    return kernel


_numba_threads = threading.local()
_disabled: set[bool] = set()
_FAILED = object()


def _run(fn, *args):
    """Run a compiled kernel. numba failing to type or compile it (a numba version that
    types differently, LLVM trouble; the tests check the compiled path runs) switches the
    compiled path off with one warning: ``_FAILED``. Under numba's workqueue threading
    layer (no OpenMP or TBB found), which aborts the process when two threads launch at
    once, calls are serialised."""
    numba = _jit()[0]
    try:
        if _serialise[0] is not False:
            with _launch_lock:
                out = fn(*args)
                try:  # known once a parallel kernel has run
                    _serialise[0] = numba.threading_layer() == "workqueue"
                except ValueError:
                    pass
            return out
        return fn(*args)
    except numba.core.errors.NumbaError as e:
        logger.warning("a compiled CPU kernel failed to compile (%s): CPU decode runs the "
                       "plain torch path", str(e).splitlines()[0])
        _disabled.add(True)
        return _FAILED


_launch_lock = threading.Lock()
_serialise: list[bool | None] = [None]  # None until the first launch picks a layer


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray | None:
    """x (T, H) fp32 contiguous, w (H,) fp32 -> (T, H) fp32 (None: compiling failed)."""
    out = _run(_jit()[2].rms_norm, x, w, np.float32(eps))
    return None if out is _FAILED else out


def small_linear(x: np.ndarray, w: np.ndarray, b: np.ndarray, threads: int
                 ) -> np.ndarray | None:
    """x (S, K) fp32 contiguous @ w (N, K)^T + b (N,) (empty: none) -> (S, N) fp32."""
    out = _run(_parallel(_jit()[3].small_linear, threads), x, w, b)
    return None if out is _FAILED else out


def decode(q: np.ndarray, kd: np.ndarray, ks: np.ndarray, kz: np.ndarray, vd: np.ndarray,
           vs: np.ndarray, vz: np.ndarray, tables: np.ndarray, lens: np.ndarray, sm: float,
           kind: int, offset: int, table: np.ndarray, threads: int, shared=None,
           lse: np.ndarray | None = None) -> np.ndarray | None:
    """q (S, Hkv, G, D) fp32 in the codes' basis; kd, vd (num_blocks, Hkv, B, row bytes)
    uint8 views of the stored rows; ks, kz, vs, vz (num_blocks, Hkv, B) uint16 fp16 bits,
    or (0, 0, 0) where the storage has none; tables (S, W) int32; lens (S,) int32, each
    >= 1; shared: cpu_plan.SharedPrefix of the batch (None: no sharing); lse: (S, Hkv, G)
    fp32 filled with each query's natural log-sum-exp (None: not wanted). Returns
    (S, Hkv, G, D) fp32 in the codes' basis (None: compiling failed)."""
    S, Hkv = q.shape[0], q.shape[1]
    nb = -(-int(lens.max()) // kd.shape[2])
    splits = num_splits(S * Hkv, nb, threads)
    fn = _parallel(_jit()[1].attend, threads)
    if lse is None:
        lse = np.empty((0, 1, 1), np.float32)
    out = _run(fn, q, kd, ks, kz, vd, vs, vz, tables, lens, np.float32(sm), kind, offset,
               table, half_table(), splits, *_shared(shared, S, Hkv, threads), lse)
    return None if out is _FAILED else out


def write_codebook_rows(x: np.ndarray, groups: int, table: np.ndarray, threads: int
                        ) -> tuple[np.ndarray, np.ndarray] | None:
    """x (N, D) fp32 contiguous, in the storage basis; ``groups`` per row, even -> (N, D / 2)
    uint8 codes (split halves) and (N, groups) uint8 e4m3 scales, as the codebook format
    writes them (table: cpu_compiled.codebook_table); None: compiling failed."""
    from . import cpu_jit_write  # importable wherever _jit() succeeded

    N, D = x.shape
    data = np.empty((N, 1, 1, D // 2), np.uint8)
    scale = np.empty((N, 1, groups // 2), np.uint16)
    fn = _parallel(cpu_jit_write.write_codebook_rows, threads)
    if _run(fn, x, data, scale, table) is _FAILED:
        return None
    return data.reshape(N, D // 2), scale.view(np.uint8).reshape(N, groups)


def _shared(shared, num_seqs: int, num_kv_heads: int, threads: int) -> tuple:
    """The kernels' shared-prefix arguments (cpu_plan.SharedPrefix; None: no sharing), and
    how many items each group's blocks are cut into so that every thread has work."""
    if shared is None:
        from .cpu_plan import SharedPrefix

        shared = SharedPrefix.none(num_seqs)
    groups = len(shared.count)
    splits = 1
    if threads > 1 and groups:
        splits = max(1, min(-(-2 * threads // (groups * num_kv_heads)),
                            int(shared.blocks.min()) // 4))
    return shared.sel, shared.slot, shared.members, shared.count, shared.blocks, splits


def decode_layer(qkv: np.ndarray, cos: np.ndarray, sin: np.ndarray, rot: int,
                 wblk: np.ndarray, woff: np.ndarray, kd, ks, kz, vd, vs, vz,
                 tables: np.ndarray, lens: np.ndarray, max_len: int, sm: float, kind: int,
                 offset: int, qmax: int, symmetric: bool, threads: int, shared=None,
                 table: np.ndarray | None = None) -> np.ndarray | None:
    """A decode layer's attention after the qkv projection (cpu_jit_loops._decode_layer):
    writes the new k, v into their slots; returns (S, Hq, D) fp32, original basis.
    shared: cpu_plan.SharedPrefix of the batch (None: no sharing); table: the codebook's
    (cpu_compiled.codebook_table; None for the other kinds)."""
    S, Hkv = qkv.shape[0], kd.shape[1]
    splits = num_splits(S * Hkv, -(-max_len // kd.shape[2]), threads)
    fn = _parallel(_jit()[1].decode_layer, threads)
    out = _run(fn, qkv, cos, sin, rot, wblk, woff, kd, ks, kz, vd, vs, vz, tables, lens,
               np.float32(sm), kind, offset, qmax, symmetric,
               _NO_TABLE if table is None else table, half_table(), splits,
               *_shared(shared, S, Hkv, threads))
    return None if out is _FAILED else out


_NO_TABLE = np.zeros(1, np.float32)


def decoder_layer(x: np.ndarray, weights: tuple, transposed: bool, eps: float,
                  cos: np.ndarray, sin: np.ndarray, rot: int, wblk: np.ndarray,
                  woff: np.ndarray, stores: tuple,
                  tables: np.ndarray, lens: np.ndarray, max_len: int, sm: float, kind: int,
                  offset: int, qmax: int, symmetric: bool, threads: int,
                  table: np.ndarray | None = None) -> bool:
    """One sequence's decoder layer (cpu_jit_layer.layer): x (H,) fp32 updated in place,
    the new k, v written. ``weights``: (ln1, wqkv, bqkv, wo, bo, ln2, wgu, bgu, wd, bd),
    the matrices (in, out) where ``transposed``, else (out, in); ``stores``: (kd, ks, kz,
    vd, vs, vz). False when compiling failed (nothing done)."""
    splits = num_splits(stores[0].shape[1], -(-max_len // stores[0].shape[2]), threads)
    fn = _parallel(_jit()[3].layer, threads)
    return _run(fn, x, *weights, transposed, np.float32(eps), cos, sin, rot, wblk, woff,
                *stores, tables, lens, np.float32(sm), kind, offset, qmax, symmetric,
                _NO_TABLE if table is None else table, half_table(), splits) is not _FAILED
