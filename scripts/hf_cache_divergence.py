"""How far ``edgekv.hf.PagedQuantizedCache`` moves a transformers model from its default cache.

For each KV format, on the same model and token ids (fixed seeds), side by side:
  bytes/token  K+V bytes the cache keeps per token (all layers, scales included), and the
               default cache's (model dtype) for comparison
  mean / max KL   KL(default || paged) of the next-token distribution, teacher-forced: a
               prefill chunk, then one token per step, as decoding reads the cache
  top-1        share of positions whose argmax agrees with the default cache's
  same greedy  greedy ``generate`` tokens equal to the default cache's, counted up to the
               first difference, summed over prompts (of prompts x new tokens)

With random weights (the default: a tiny random Llama) logits are nearly flat, so argmax
ties flip easily; the KL column is the meaningful one. ``--model DIR`` runs a real
checkpoint instead.

    python scripts/hf_cache_divergence.py                 # a few minutes on 2 CPUs
    python scripts/hf_cache_divergence.py --model DIR --formats fp16,int8,int4
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig

from edgekv.hf import PagedQuantizedCache


def tiny_llama() -> torch.nn.Module:
    """The tests' tiny Llama shape: 2 layers, 8 query / 2 KV heads of 32, vocab 320."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=320, hidden_size=128, intermediate_size=256,
                      num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                      head_dim=32, max_position_embeddings=512)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)  # peaked logits, as in tests/tiny_models.py
    return model.eval()


@torch.no_grad()
def teacher_forced(model, cache, ids: torch.Tensor, prefill: int) -> torch.Tensor:
    out = [model(ids[:, :prefill], past_key_values=cache, use_cache=True).logits]
    for t in range(prefill, ids.shape[1]):
        out.append(model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits)
    return torch.cat(out, 1).float()  # (batch, T, vocab)


@torch.no_grad()
def greedy(model, ids: torch.Tensor, cache, new: int) -> torch.Tensor:
    out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                         past_key_values=cache, pad_token_id=0)
    return out[:, ids.shape[1]:]  # (batch, new)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="HF model dir (default: tiny random Llama)")
    ap.add_argument("--formats", default="fp16,bf16,int8,fp8,int4")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--length", type=int, default=96, help="tokens per teacher-forced row")
    ap.add_argument("--new-tokens", type=int, default=32)
    a = ap.parse_args()
    model = tiny_llama() if a.model is None else AutoModelForCausalLM.from_pretrained(
        a.model).eval()
    vocab = model.config.vocab_size
    rows = []
    for fmt in a.formats.split(","):
        kls, maxkl, top1, same, total = [], 0.0, [], 0, 0
        for seed in range(a.seeds):
            g = torch.Generator().manual_seed(seed)
            ids = torch.randint(3, vocab, (2, a.length), generator=g)  # (2, length)
            ref = teacher_forced(model, DynamicCache(config=model.config), ids, 16)
            cache = PagedQuantizedCache(model.config, kv_format=fmt, kv_memory="64MiB")
            got = teacher_forced(model, cache, ids, 16)
            lp, lq = ref.log_softmax(-1), got.log_softmax(-1)
            kl = (lp.exp() * (lp - lq)).sum(-1)  # (2, length)
            kls.append(kl.mean().item())
            maxkl = max(maxkl, kl.max().item())
            top1.append((ref.argmax(-1) == got.argmax(-1)).float().mean().item())
            bytes_per_token = cache.kv_stats()["bytes_per_token"]
            p = ids[:, :20]
            want = greedy(model, p, None, a.new_tokens)
            have = greedy(model, p, PagedQuantizedCache(model.config, fmt, "64MiB"),
                          a.new_tokens)
            for w, h in zip(want.tolist(), have.tolist(), strict=True):
                diff = [i for i, (x, y) in enumerate(zip(w, h, strict=True)) if x != y]
                same += diff[0] if diff else len(w)
                total += len(w)
        rows.append((fmt, bytes_per_token, sum(kls) / len(kls), maxkl, sum(top1) / len(top1),
                     same, total))
    c = model.config
    dense = 2 * c.num_hidden_layers * c.num_key_value_heads * (
        getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    ) * next(model.parameters()).element_size()
    print(f"default cache: {dense:,} bytes/token ({next(model.parameters()).dtype})")
    print("| format | bytes/token | mean KL | max KL | top-1 | same greedy |")
    print("|---|---|---|---|---|---|")
    for fmt, b, kl, mx, t1, s, n in rows:
        print(f"| {fmt} | {b:,} | {kl:.1e} | {mx:.1e} | {t1:.3f} | {s}/{n} |")


if __name__ == "__main__":
    main()
