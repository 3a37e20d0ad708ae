"""Checks a session file's contents before anything of the live chat is touched.

``check_session`` turns what was read from a file into a ``CheckedSession``: every value
validated, the KV blocks already in the cache's dtypes and on its device, and the pool's
room for them counted. It reads the engine and changes nothing. The checks run in this
order and each refusal is a one-line ValueError naming its cause:

    format          an EdgeKV session file, of this version
    identity        same model (hash), KV format and block size as this chat
    checksum        sha256 over the token ids, every tensor's bytes and the metadata
                    fields below: a flipped bit anywhere in them is caught here
    token ids       in [0, vocab)
    scales          every stored scale finite and > 0, every zero point finite
    messages        a list of {"role": system|user|assistant, "content": str}
    counts          token counts in range, tensors of the expected names, shapes, dtypes
    room            the pool has the blocks, counting those this chat would free

The later checks matter for files written with a valid checksum over bad values (a bug, or
a crafted file): such a file must not load and then crash the next turn.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from edgekv.session.blocks import BlockTensor, block_tensors, kv_identity, signed_scale

FILE_FORMAT = "edgekv-session-2"
OLD_FORMATS = ("edgekv-session-1",)  # written before files carried a checksum
# the metadata the checksum covers: everything loading reads back
CHECKED_META = ("format", "model", "kv_format", "block_size", "num_computed", "num_evicted",
                "num_prompt", "messages", "prompt_text")
ROLES = ("system", "user", "assistant")


def session_checksum(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> str:
    """sha256 (hex) over the ``CHECKED_META`` fields and every tensor (name, dtype, shape,
    bytes), in a fixed order; each field is length-prefixed so none can run into the next."""
    h = hashlib.sha256()
    for key in CHECKED_META:
        value = meta.get(key)
        h.update(f"{key}!\n".encode() if value is None else
                 f"{key}={len(value)}:{value}\n".encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class CheckedSession:
    """A session file's contents, validated; installing it cannot fail for want of room.

    blocks: blocks.BlockTensor (a tier, layer, K or V, part) -> (its entries,
            Hkv, B, ...) on the cache's device, in its dtype, in table order; empty when
            nothing is cached
    scores: (<= num_blocks,) fp32 an eviction policy's block scores, or None
    tiers:  the age tier of each table entry (all 0 without tiers)
    """

    tokens: list[int]
    num_prompt: int
    num_computed: int
    num_evicted: int
    messages: list[dict]
    prompt_text: str
    blocks: dict[BlockTensor, torch.Tensor]
    scores: torch.Tensor | None
    positions: list[int]  # rotary position of each block's first slot (context shift)
    tiers: list[int]

    @property
    def num_cached(self) -> int:
        return self.num_computed - self.num_evicted


def check_session(chat, path: Path, meta: dict[str, str], tensors: dict[str, torch.Tensor],
                  model: str) -> CheckedSession:
    """Validate a file's metadata and tensors for ``chat``, whose model's identity hash is
    ``model``; raises ValueError (one line, naming the failed check) and changes nothing."""
    llm = chat.llm
    _check_format(path, meta.get("format"))
    if meta.get("model") != model:
        raise ValueError(f"{path} was saved with another model (identity "
                         f"{meta.get('model')!r}; this model is {model!r})")
    for key, value in (("kv_format", kv_identity(llm.cache_config)),
                       ("block_size", str(llm.cache_config.block_size))):
        if meta.get(key) != value:
            raise ValueError(f"{path} was saved with {key}={meta.get(key)!r}; this session "
                             f"uses {value!r}")
    if meta.get("checksum") != session_checksum(tensors, meta):
        raise ValueError(f"{path} fails its checksum: the file is damaged")
    tokens = _check_tokens(path, tensors.get("tokens"), llm.model_config.vocab_size)
    _check_scales(path, tensors, llm.cache_config)
    messages = _check_messages(path, meta.get("messages"))
    return _check_counts(chat, path, meta, tensors, tokens, messages)


def _check_format(path: Path, fmt: str | None) -> None:
    if fmt == FILE_FORMAT:
        return
    if fmt in OLD_FORMATS:
        raise ValueError(f"{path} was written by an older version of EdgeKV ({fmt}, without "
                         f"a checksum); this version cannot load it")
    if fmt is not None and fmt.startswith("edgekv-session-"):
        raise ValueError(f"{path} was written by a newer version of EdgeKV ({fmt})")
    raise ValueError(f"{path} is not an EdgeKV session file")


def _check_tokens(path: Path, t: torch.Tensor | None, vocab: int) -> list[int]:
    if t is None or t.dim() != 1 or t.dtype != torch.int64:
        raise ValueError(f"{path} is inconsistent: its token ids are missing or malformed")
    bad = t[(t < 0) | (t >= vocab)]
    if len(bad):
        raise ValueError(f"{path} holds token id {int(bad[0])}, outside this model's "
                         f"vocabulary [0, {vocab})")
    return t.tolist()


def _check_scales(path: Path, tensors: dict[str, torch.Tensor], cache_config) -> None:
    """Every stored slot, written or not: a block's unwritten slots hold 1 (fresh) or an
    earlier token's scale, both finite and positive (nonzero where the block's format has
    signed scales), and a kernel may read them."""
    for name in sorted(tensors):
        t = tensors[name].float()
        signed_here = signed_scale(cache_config, name)
        ok = t != 0 if signed_here else t > 0
        if name.endswith(".scale") and not bool(torch.all(torch.isfinite(t) & ok)):
            what = "zero" if signed_here else "non-positive"
            raise ValueError(f"{path} holds a non-finite or {what} KV scale ({name})")
        if name.endswith(".zero") and not bool(torch.all(torch.isfinite(t))):
            raise ValueError(f"{path} holds a non-finite KV zero point ({name})")


def _check_messages(path: Path, text: str | None) -> list[dict]:
    try:
        messages = json.loads(text) if text is not None else None
    except json.JSONDecodeError:
        messages = None
    ok = isinstance(messages, list) and all(
        isinstance(m, dict) and set(m) == {"role", "content"} and m["role"] in ROLES
        and isinstance(m["content"], str) for m in messages)
    ok = ok and all(m["role"] != "system" for m in messages[1:])  # a system prompt leads
    if not ok:
        raise ValueError(f"{path} has bad messages: expected a list of {{role: "
                         f"system|user|assistant, content: text}}")
    return messages


def _check_counts(chat, path: Path, meta: dict[str, str], tensors: dict[str, torch.Tensor],
                  tokens: list[int], messages: list[dict]) -> CheckedSession:
    def inconsistent(what: str) -> ValueError:
        return ValueError(f"{path} is inconsistent: {what}")

    try:
        num_computed, num_prompt = int(meta["num_computed"]), int(meta["num_prompt"])
        num_evicted = int(meta["num_evicted"])
        prompt_text = meta["prompt_text"]
    except (KeyError, ValueError):
        raise inconsistent("its token counts are missing or not integers") from None
    n = len(tokens)
    if not (0 <= num_evicted <= num_computed <= n and 0 <= num_prompt <= n):
        raise inconsistent(f"counts computed={num_computed}, evicted={num_evicted}, "
                           f"prompt={num_prompt} for {n} tokens")
    engine = chat.llm.engine
    nb = -(-(num_computed - num_evicted) // engine.manager.block_size)
    tiers = _check_tiers(path, tensors.get("block_tiers"), nb, engine.cache_config)
    blocks = {}
    for bt in block_tensors(engine.cache, tiers):
        saved = tensors.get(bt.key)
        shape = (len(bt.rows), *bt.store.shape[1:])
        if saved is None or saved.shape != shape or saved.dtype != bt.store.dtype:
            raise inconsistent(f"{bt.key} is missing or not {shape} {bt.store.dtype}")
        blocks[bt] = saved.to(bt.store.device)
    scores = tensors.get("eviction_scores")
    if scores is not None and (scores.dim() != 1 or len(scores) > nb):
        raise inconsistent(f"{len(scores)} eviction scores for {nb} blocks")
    positions = _check_positions(path, tensors.get("block_positions"), nb,
                                 engine.manager.block_size,
                                 chat.llm.model_config.max_position)
    extra = set(tensors) - {"tokens", "eviction_scores", "block_positions", "block_tiers"} - {
        bt.key for bt in blocks}
    if extra:
        raise inconsistent(f"unexpected tensor {sorted(extra)[0]}")
    _check_room(chat, path, tiers, num_computed - num_evicted)
    if scores is not None:
        scores = scores.float().to(chat.llm.device)
    return CheckedSession(tokens, num_prompt, num_computed, num_evicted, messages,
                          prompt_text, blocks, scores, positions, tiers)


def _check_tiers(path: Path, t: torch.Tensor | None, nb: int, cache_config) -> list[int]:
    """The age tier of each of the ``nb`` table entries: the file's ``block_tiers`` with
    age tiers (each in range), all 0 without."""
    if cache_config.tiers is None or (nb == 0 and t is None):  # nothing cached: no tiers
        return [0] * nb
    n = len(cache_config.tiers.formats)
    tiers = t.tolist() if t is not None and t.dim() == 1 and t.dtype == torch.int64 else None
    if tiers is None or len(tiers) != nb or any(not 0 <= x < n for x in tiers):
        raise ValueError(f"{path} is inconsistent: its block tiers are missing or not "
                         f"{nb} tiers in [0, {n})")
    return tiers


def _check_positions(path: Path, t: torch.Tensor | None, nb: int, block_size: int,
                     context: int) -> list[int]:
    """Each block's first rotary position: ascending, a block apart at least, inside the
    context (a table's positions, see block_manager.BlockTable)."""
    if nb == 0:
        return []
    pos = t.tolist() if t is not None and t.dim() == 1 else None
    if (pos is None or len(pos) != nb or pos[0] < 0 or pos[-1] >= context
            or any(b - a < block_size for a, b in zip(pos, pos[1:], strict=False))):
        raise ValueError(f"{path} is inconsistent: its block positions are missing or out "
                         f"of order")
    return pos


def _check_room(chat, path: Path, tiers: list[int], num_cached: int) -> None:
    """The new table needs a fresh block per entry, each in its tier (``tiers``); the
    chat's current blocks that no other sequence holds return to the pool when it is
    replaced, so they count as room."""
    mgr = chat.llm.engine.manager
    own = [0] * mgr.pool.num_tiers
    if chat.seq is not None and chat.seq.seq_id in mgr.tables:
        for b in mgr.tables[chat.seq.seq_id].block_ids:
            if b is not None and mgr.pool.ref_counts[b] == 1:
                own[mgr.pool.tier_of(b)] += 1
    for t in sorted(set(tiers)):
        needed, free = tiers.count(t), mgr.pool.num_free_in(t)
        if needed > free + own[t]:
            where = f" of tier {t}" if mgr.pool.num_tiers > 1 else ""
            raise ValueError(f"{path} does not fit in the KV pool: its {num_cached} cached "
                             f"tokens need {needed} blocks{where}, {free} are free "
                             f"(+{own[t]} of this conversation)")
