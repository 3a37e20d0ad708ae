"""What prefix caching saves, and what offload moves, measured side by side in one run.

Part 1: --requests requests share a --prefix-token prompt prefix (the demo model's context
is 1,024 tokens, so 896 shared + 16 own + 16 generated fit) and are run with and without
prefix caching. Reported per configuration:
  blocks held    KV blocks in use once every request is decoding (``kv_stats()``)
  prefill s      wall time from adding the requests until each has its first token
  hit tokens     prompt tokens found in the prefix cache instead of computed
  same output    greedy outputs equal to the run without prefix caching
Part 2: the same requests through a device pool too small for all of them, with a host
pool (offload) for each KV format: sequences swapped out and back, and bytes moved per
swapped block (int4 blocks move about a quarter of the bytes of fp16 ones).

    python scripts/bench_prefix_sharing.py                 # demo model, ~1-2 min on 2 CPUs
"""

from __future__ import annotations

import argparse
import time

import torch

from edgekv import LLM, SamplingParams


def prompts(n: int, prefix_len: int, suffix_len: int, vocab: int, seed: int = 0
            ) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(3, vocab, (prefix_len,), generator=g).tolist()
    return [prefix + torch.randint(3, vocab, (suffix_len,), generator=g).tolist()
            for _ in range(n)]


def prefill_then_finish(llm: LLM, ps: list[list[int]], params: SamplingParams):
    """(blocks held once all decode, prefill seconds, outputs)."""
    eng = llm.engine
    seqs = [eng.new_sequence(p, params) for p in ps]
    t0 = time.perf_counter()
    for s in seqs:
        eng.add(s)
    while any(s.num_outputs == 0 for s in seqs):
        eng.step()
    prefill = time.perf_counter() - t0
    blocks = llm.kv_stats()["blocks_used"]
    while any(not s.finished for s in seqs):
        eng.step()
    return blocks, prefill, [s.output_ids for s in seqs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--prefix-tokens", type=int, default=896)
    ap.add_argument("--suffix-tokens", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--kv-format", default="int8")
    args = ap.parse_args()
    torch.manual_seed(0)
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)

    print(f"{args.requests} requests, {args.prefix_tokens}-token shared prefix + "
          f"{args.suffix_tokens} own tokens, {args.new_tokens} generated, {args.kv_format}")
    print(f"{'prefix caching':<16}{'blocks held':>12}{'KV MiB':>9}{'prefill s':>11}"
          f"{'hit tokens':>12}{'same output':>13}")
    rows, want = {}, None
    for on in (False, True):
        llm = LLM(args.model, kv_format=args.kv_format, kv_memory="64MiB", prefix_caching=on)
        ps = prompts(args.requests, args.prefix_tokens, args.suffix_tokens,
                     llm.model_config.vocab_size)
        warm = prompts(1, 64, 0, llm.model_config.vocab_size, seed=1)  # shares no block
        prefill_then_finish(llm, warm, params)  # warm-up
        blocks, secs, outs = prefill_then_finish(llm, ps, params)
        want = want or outs
        s = llm.kv_stats()
        mib = blocks * llm.cache_config.bytes_per_block / 2**20
        rows[on] = (blocks, secs)
        print(f"{'on' if on else 'off':<16}{blocks:>12}{mib:>9.2f}{secs:>11.2f}"
              f"{s['prefix_hit_tokens']:>12}{str(outs == want):>13}")
    print(f"prefix caching: {rows[False][0] / rows[True][0]:.1f}x fewer blocks, "
          f"{rows[False][1] / rows[True][1]:.1f}x faster prefill")

    print("\noffload: device pool of 80 blocks, host pool of 512 blocks, prefix caching off")
    print(f"{'kv format':<10}{'bytes/block':>12}{'swaps out':>11}{'blocks moved':>14}"
          f"{'MiB moved':>11}{'same output':>13}")
    per = {}
    for fmt in ("fp16", "int8", "int4"):
        probe = LLM(args.model, kv_format=fmt, kv_memory="1MiB")
        b = probe.cache_config.bytes_per_block
        ref = LLM(args.model, kv_format=fmt, kv_memory="64MiB", prefix_caching=False)
        want_fmt = [o.token_ids for o in ref.generate(ps, params)]
        llm = LLM(args.model, kv_format=fmt, kv_memory=80 * b, offload_memory=512 * b,
                  prefix_caching=False)
        got = [o.token_ids for o in llm.generate(ps, params)]
        s = llm.kv_stats()
        moved = s["swap_bytes_out"] + s["swap_bytes_in"]
        per[fmt] = b
        print(f"{fmt:<10}{b:>12}{s['swaps_out']:>11}"
              f"{s['swapped_out_blocks'] + s['swapped_in_blocks']:>14}"
              f"{moved / 2**20:>11.2f}{str(got == want_fmt):>13}")
    print(f"bytes per swapped block: int4/fp16 = {per['int4'] / per['fp16']:.3f}, "
          f"int8/fp16 = {per['int8'] / per['fp16']:.3f}")


if __name__ == "__main__":
    main()
