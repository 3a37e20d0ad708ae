"""Save and load a chat session: its tokens and its quantized KV blocks, in safetensors.

File layout (one safetensors file):
    tokens                   (n,) int64       the conversation's tokens
    block_positions          (num_blocks,) int64  rotary position of each block's first slot
    L{i}.{k|v}.{data|scale|zero}  (num_blocks, Hkv, B, ...)  layer i's blocks, in table order
                             (with age tiers: T{t}.L{i}... per tier, and block_tiers;
                             blocks.py)
    eviction_scores          (num_blocks,) fp32   an eviction policy's block scores, if any
    metadata (str -> str):   format, model, kv_format, block_size, num_computed,
                             num_evicted, num_prompt, messages (JSON), prompt_text,
                             checksum (sha256 over all of the above: check.py)
The blocks are stored as they are in the cache (codes and their scales), so loading
restores the exact cache without recomputing it. A file made by another model (identity
hash), another KV format or block size is refused, as is a damaged file.

Saving writes a temporary file beside the target, syncs it, then renames it over the
target: a reader never sees half a session, and a failed save leaves nothing behind.
Loading validates the whole file first (``check_session``) and only then replaces the
conversation.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from edgekv.engine.sampling import SamplingParams
from edgekv.session.blocks import BlockTensor, block_tensors, kv_identity
from edgekv.session.check import FILE_FORMAT, CheckedSession, check_session, session_checksum

__all__ = ["FILE_FORMAT", "SessionExists", "load_session", "model_identity", "save_session"]


class SessionExists(ValueError):
    """``save_session`` refused to replace an existing file (``overwrite=False``)."""


def model_identity(model_dir: Path) -> str:
    """A short hash of the model's config and the first and last 64 KiB of each shard."""
    h = hashlib.sha256((model_dir / "config.json").read_bytes())
    for f in sorted(model_dir.glob("*.safetensors")):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(65536))
            fh.seek(max(size - 65536, 0))
            h.update(fh.read(65536))
    return h.hexdigest()[:16]


# ---- save ------------------------------------------------------------------------------
def save_session(chat, path: str | Path, overwrite: bool = False) -> int:
    """Write the session to ``path`` (``~`` expanded); returns the number of cached tokens
    saved. Raises ValueError (one line) if ``path`` is a directory, its directory does not
    exist, or it cannot be written, and SessionExists (a ValueError) if it exists and
    ``overwrite`` is False. The write is atomic: on any failure the target is as it was
    and no temporary file is left. The file is created readable by its owner only."""
    with _path_errors("save to", path):
        path = Path(path).expanduser()
        if path.is_dir():
            raise ValueError(f"{path} is a directory; name a file to save to")
        if not path.parent.is_dir():
            what = "is not a directory" if path.parent.exists() else "does not exist"
            raise ValueError(f"cannot save to {path}: {path.parent} {what}")
        if path.exists() and not overwrite:
            raise SessionExists(f"{path} already exists (overwrite=True replaces it)")
    with chat.engine.hold():  # one thread at a time (guard.py)
        tensors, meta, num_cached = _session_contents(chat)
    meta["checksum"] = session_checksum(tensors, meta)
    try:
        _write_atomically(path, safetensors_bytes(tensors, metadata=meta))
    except OSError as e:
        raise ValueError(f"cannot save to {path}: {e.strerror or e}") from None
    return num_cached


def _session_contents(chat) -> tuple[dict[str, torch.Tensor], dict[str, str], int]:
    llm, seq = chat.llm, chat.seq
    tensors: dict[str, torch.Tensor] = {}
    num_computed = num_evicted = 0
    if seq is not None:
        tensors["tokens"] = torch.tensor(seq.token_ids, dtype=torch.int64)
        if seq.seq_id in llm.engine.manager.tables:
            num_computed, num_evicted = seq.num_computed, seq.num_evicted
            sources = _block_sources(llm.engine, seq.seq_id)
            tensors["block_positions"] = torch.tensor(
                llm.engine.manager.tables[seq.seq_id].positions, dtype=torch.int64)
            ev = llm.engine.evictor
            if ev is not None and seq.seq_id in ev.scores:  # what h2o/snapkv have seen
                tensors["eviction_scores"] = ev.scores[seq.seq_id].cpu().clone()
            cache = llm.engine.cache
            tiers = [cache.tier_of(b) if c is cache else 0 for c, b in sources]
            if cache.config.tiers is not None:
                tensors["block_tiers"] = torch.tensor(tiers, dtype=torch.int64)
            for bt in block_tensors(cache, tiers):
                tensors[bt.key] = torch.stack([_stored(c, b, bt).cpu()
                                               for c, b in (sources[r] for r in bt.rows)])
    else:
        tensors["tokens"] = torch.zeros(0, dtype=torch.int64)
    meta = {
        "format": FILE_FORMAT,
        "model": model_identity(llm.model_dir),
        "kv_format": kv_identity(llm.cache_config),
        "block_size": str(llm.cache_config.block_size),
        "num_computed": str(num_computed),
        "num_evicted": str(num_evicted),
        "num_prompt": str(seq.num_prompt if seq else 0),
        "messages": json.dumps(chat.messages),
        "prompt_text": chat._prompt_text,
    }
    return {k: v.contiguous() for k, v in tensors.items()}, meta, num_computed - num_evicted


def _stored(cache, block: int, bt: BlockTensor) -> torch.Tensor:
    """Block ``block`` (a global id of ``cache``) of the tensor ``bt`` names."""
    store = getattr(cache.tier_layers[bt.tier][bt.layer][bt.kv], bt.part)
    return store[block - cache.offsets[bt.tier]]


def _block_sources(engine, seq_id: int) -> list[tuple[object, int]]:
    """(cache, block id) of each table entry, in order: the device cache, or the host
    pool's cache for blocks offloaded there (read in place, nothing is swapped back)."""
    t = engine.manager.tables[seq_id]
    host = engine.scheduler.offloader.host_cache if t.host else None
    return [(engine.cache, b) if b is not None else (host, t.host[i])
            for i, b in enumerate(t.block_ids)]


def _write_atomically(path: Path, data: bytes) -> None:
    """Temporary file in the target's directory, fsync, rename over the target; the
    temporary file is removed on any failure (interrupts included)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable, where possible
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


# ---- load ------------------------------------------------------------------------------
def load_session(chat, path: str | Path) -> int:
    """Replace the session's conversation and cache with the file's (``~`` expanded).
    Returns the number of cached tokens loaded.

    Raises ValueError (one line naming the failed check: see check.py) and leaves
    the session exactly as it was (tokens, blocks, messages, the block pool) if the file
    is missing, unreadable, not a session of this model, format and block size, damaged,
    or does not fit in the pool."""
    with _path_errors("load", path):
        path = Path(path).expanduser()
        meta, tensors = _read(path)
    with chat.engine.hold():  # one thread at a time; a Ctrl-C waits for the install
        if chat.seq is not None and not chat.seq.finished:
            raise ValueError("a reply is still being streamed: finish or close it first")
        checked = check_session(chat, path, meta, tensors, model_identity(chat.llm.model_dir))
        return _install(chat, checked)


@contextlib.contextmanager
def _path_errors(verb: str, path):
    """A path the OS will not even look at (a name too long, a folder we may not read,
    ``~nosuchuser``) is a ValueError too."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise ValueError(f"cannot {verb} {path}: {reason}") from None


def _read(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    if not path.exists():
        raise ValueError(f"no such session file: {path}")
    if path.is_dir():
        raise ValueError(f"{path} is a directory, not a session file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types, or OSError
        raise ValueError(f"{path} is truncated or not a readable session file "
                         f"({type(e).__name__})") from None
    return meta, tensors


def _install(chat, s: CheckedSession) -> int:
    """Make the checked session the chat's. The old conversation's blocks are released
    after the new ones are written, or before when only they make the room; a failure
    while writing (never expected: shapes, dtypes, devices and room are checked) frees
    what was taken and puts the old conversation back. In the second case its cache is
    gone by then and is recomputed on its next turn."""
    engine = chat.engine
    old = (chat.seq, chat.messages, chat._prompt_text)
    pool = engine.manager.pool
    free_first = any(s.tiers.count(t) > pool.num_free_in(t) for t in set(s.tiers))
    if free_first:
        chat.reset()
    seq = engine.new_sequence(s.tokens, SamplingParams(), keep_cache=True) if s.tokens else None
    try:
        if seq is not None:
            _fill(engine, seq, s)
    except BaseException:
        if seq is not None:
            engine.scheduler.release(seq)
        chat.seq, chat.messages, chat._prompt_text = old
        raise
    if not free_first:
        chat.reset()
    chat.seq, chat.messages, chat._prompt_text = seq, s.messages, s.prompt_text
    chat.turns = sum(m["role"] == "user" for m in s.messages)  # seeds the next turns
    lead = s.messages[0] if s.messages else None
    chat.system = lead["content"] if lead is not None and lead["role"] == "system" else None
    return s.num_cached


def _fill(engine, seq, s: CheckedSession) -> None:
    """Give ``seq`` a table of fresh blocks holding the file's bytes, then park it."""
    seq.num_prompt = s.num_prompt
    if s.blocks:
        ids = engine.manager.adopt(seq.seq_id, s.tiers, s.num_cached)
        _write_blocks(engine.cache, ids, s.blocks)
        engine.manager.tables[seq.seq_id].positions = list(s.positions)
        seq.num_computed, seq.num_evicted = s.num_computed, s.num_evicted
        if engine.evictor is not None and s.scores is not None:
            engine.evictor.scores[seq.seq_id] = s.scores
    engine.scheduler.finish(seq, "stop")  # parked: blocks kept for the next turn


def _write_blocks(cache, ids: list[int], blocks: dict[BlockTensor, torch.Tensor]) -> None:
    """ids: the new table's global block ids, in table order; blocks as in CheckedSession."""
    for bt, saved in blocks.items():
        local = torch.tensor([ids[r] - cache.offsets[bt.tier] for r in bt.rows],
                             dtype=torch.long, device=bt.store.device)
        bt.store[local] = saved
