"""Save and load a chat session: its tokens and its quantized KV blocks, in safetensors.

File layout (one safetensors file):
    tokens                   (n,) int64       the conversation's tokens
    block_positions          (num_blocks,) int64  rotary position of each block's first slot
    L{i}.{k|v}.{data|scale|zero}  (num_blocks, Hkv, B, ...)  layer i's blocks, in table order
    eviction_scores          (num_blocks,) fp32   an eviction policy's block scores, if any
    metadata (str -> str):   format, model, kv_format, block_size, num_computed,
                             num_evicted, num_prompt, messages (JSON), system
The blocks are stored as they are in the cache (codes and their scales), so loading
restores the exact cache without recomputing it. A file made by another model (identity
hash), another KV format or block size is refused, as is a damaged file.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .sampling import SamplingParams

FILE_FORMAT = "edgekv-session-1"


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


def save_session(chat, path: str | Path) -> int:
    """Write the session to ``path``; returns the number of cached tokens saved."""
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
            for i in range(len(llm.engine.cache.layers)):
                for j, name in enumerate("kv"):
                    for part in ("data", "scale", "zero"):
                        if getattr(llm.engine.cache.layers[i][j], part) is None:
                            continue
                        tensors[f"L{i}.{name}.{part}"] = torch.stack(
                            [getattr(c.layers[i][j], part)[b].cpu() for c, b in sources])
    else:
        tensors["tokens"] = torch.zeros(0, dtype=torch.int64)
    meta = {
        "format": FILE_FORMAT,
        "model": model_identity(llm.model_dir),
        "kv_format": llm.cache_config.kv_format,
        "block_size": str(llm.cache_config.block_size),
        "num_computed": str(num_computed),
        "num_evicted": str(num_evicted),
        "num_prompt": str(seq.num_prompt if seq else 0),
        "messages": json.dumps(chat.messages),
        "prompt_text": chat._prompt_text,
    }
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)
    return num_computed - num_evicted


def _block_sources(engine, seq_id: int) -> list[tuple[object, int]]:
    """(cache, block id) of each table entry, in order: the device cache, or the host
    pool's cache for blocks offloaded there (read in place, nothing is swapped back)."""
    t = engine.manager.tables[seq_id]
    host = engine.scheduler.offloader.host_cache if t.host else None
    return [(engine.cache, b) if b is not None else (host, t.host[i])
            for i, b in enumerate(t.block_ids)]


def load_session(chat, path: str | Path) -> int:
    """Replace the session's conversation and cache with the file's. Raises ValueError
    (and leaves the session as it was) if the file is not a session of this model,
    format and block size, or is damaged. Returns the number of cached tokens loaded."""
    llm = chat.llm
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise ValueError(f"no such session file: {path}") from None
    except Exception as e:
        raise ValueError(f"{path} is not a readable session file ({type(e).__name__})") from None
    if meta.get("format") != FILE_FORMAT:
        raise ValueError(f"{path} is not an EdgeKV session file")
    want = {"model": model_identity(llm.model_dir), "kv_format": llm.cache_config.kv_format,
            "block_size": str(llm.cache_config.block_size)}
    for key, value in want.items():
        if meta.get(key) != value:
            raise ValueError(f"{path} was saved with {key}={meta.get(key)!r}; this session "
                             f"uses {value!r}")
    try:
        tokens = tensors["tokens"].tolist()
        num_computed, num_prompt = int(meta["num_computed"]), int(meta["num_prompt"])
        num_evicted = int(meta.get("num_evicted", "0"))
        num_cached = num_computed - num_evicted
        messages = json.loads(meta["messages"])
        assert 0 <= num_computed <= len(tokens) and 0 <= num_prompt <= len(tokens)
        assert 0 <= num_evicted <= num_computed
        nb = -(-num_cached // llm.cache_config.block_size)
        layers = llm.engine.cache.layers
        blocks = {}
        for i, layer in enumerate(layers):
            for name, store in zip("kv", layer, strict=True):
                for part in ("data", "scale", "zero"):
                    t = getattr(store, part)
                    if t is None or nb == 0:
                        continue
                    saved = tensors[f"L{i}.{name}.{part}"]
                    assert saved.shape == (nb, *t.shape[1:]) and saved.dtype == t.dtype
                    blocks[(i, name, part)] = saved
        positions = None
        if nb and "block_positions" in tensors:
            positions = tensors["block_positions"].tolist()
            bs = llm.cache_config.block_size
            assert len(positions) == nb and positions[0] >= 0
            assert all(b - a >= bs for a, b in zip(positions, positions[1:], strict=False))
            assert positions[-1] < llm.model_config.max_position
    except (KeyError, AssertionError, ValueError, json.JSONDecodeError):
        raise ValueError(f"{path} is damaged or incomplete") from None
    chat.reset()
    chat.messages = messages
    chat._prompt_text = meta.get("prompt_text", "")
    if not tokens:
        return 0
    engine = llm.engine
    seq = engine.new_sequence(tokens, SamplingParams(), keep_cache=True)
    seq.num_prompt = num_prompt
    if nb:
        if not engine.manager.can_append(seq.seq_id, num_cached):
            raise ValueError(f"{path} holds {num_cached} cached tokens; the KV pool has "
                             f"room for {engine.manager.pool.num_free} blocks")
        engine.manager.append_slots(seq.seq_id, num_cached)
        if positions is not None:
            engine.manager.tables[seq.seq_id].positions = positions
        ids = torch.tensor(engine.manager.block_ids(seq.seq_id), dtype=torch.long)
        for (i, name, part), saved in blocks.items():
            store = layers[i][0 if name == "k" else 1]
            t = getattr(store, part)
            t[ids.to(t.device)] = saved.to(t.device)
        seq.num_computed, seq.num_evicted = num_computed, num_evicted
        scores = tensors.get("eviction_scores")
        if engine.evictor is not None and scores is not None and len(scores) <= nb:
            engine.evictor.scores[seq.seq_id] = scores.float()
    engine.scheduler.finish(seq, "stop")  # parked: blocks kept for the next turn
    chat.seq = seq
    return num_cached
