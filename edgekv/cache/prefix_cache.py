"""Prefix-cache hashes: a full block is named by a hash chained over its whole prefix.

::

    tokens:  [ t0 .. t15 | t16 .. t31 | t32 .. t40 ]      block_size 16
    hashes:    h0 = H(salt, t0..t15)
               h1 = H(h0,   t16..t31)                     the partial last block has none

Two sequences share block ``i`` exactly when their first ``(i + 1) * block_size`` tokens
agree, and the salt (the KV format and block size: what else decides a block's bytes)
is the same. BLAKE2b with a 16-byte digest: no collisions in practice, and stable across
processes (unlike Python's ``hash`` of strings).
"""

from __future__ import annotations

import hashlib
from array import array


def block_hash(parent: bytes, tokens: list[int]) -> bytes:
    """The hash of a full block holding ``tokens`` after the prefix named ``parent``."""
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(array("q", tokens).tobytes())
    return h.digest()


def cache_salt(kv_format: str, block_size: int) -> bytes:
    """The root of every chain: what, besides the tokens, decides a block's bytes."""
    return f"edgekv/{kv_format}/{block_size}".encode()


def sequence_hashes(seq, num_tokens: int, block_size: int, salt: bytes) -> list[bytes]:
    """The chain hashes of the full blocks of ``seq.token_ids[:num_tokens]``, cached on the
    Sequence (``block_hashes``/``hashed_ids``) and cut back if its tokens were rewritten."""
    hashes, done = seq.block_hashes, seq.hashed_ids
    if seq.token_ids[: len(done)] != done:
        common = 0
        while common < min(len(done), seq.num_tokens) and done[common] == seq.token_ids[common]:
            common += 1
        del hashes[common // block_size :]
        del done[len(hashes) * block_size :]
    extend_hashes(hashes, seq.token_ids, num_tokens, block_size, salt)
    done.extend(seq.token_ids[len(done) : len(hashes) * block_size])
    return hashes


def extend_hashes(hashes: list[bytes], token_ids: list[int], num_tokens: int,
                  block_size: int, salt: bytes) -> list[bytes]:
    """Append the hashes of the full blocks of ``token_ids[:num_tokens]`` that ``hashes``
    lacks, in place, and return it. ``hashes`` must be a prefix of this sequence's chain."""
    for i in range(len(hashes), num_tokens // block_size):
        parent = hashes[-1] if hashes else salt
        hashes.append(block_hash(parent, token_ids[i * block_size : (i + 1) * block_size]))
    return hashes
