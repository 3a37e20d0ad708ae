"""What a context shift costs: perplexity far past the model's context, with eviction.

One request of ``--contexts`` x the model's context (4 x 1,024 tokens on the bundled demo
model, its held-out text) is scored token by token through the cache, exactly as decode
reads it, with an eviction policy and budget: the cache shifts its positions whenever
the next token would reach the context (``edgekv/cache/context_shift.py``). Printed per KV
format:

- ppl of the last window (the last context-length targets, read through a cache that
  has shifted ``shifts`` times) beside ppl of the first window with the same eviction
  (no shift yet) and the plain no-eviction, no-shift reference on the first window;
- KL of the format against fp32 storage, on the first window (quantization alone) and on
  the last (quantization plus one re-quantization of the kept keys per shift): what
  re-rotating quantized keys costs.

    python scripts/bench_context_shift.py [--contexts 4] [--budget 256] [--policy streaming]
"""

from __future__ import annotations

import argparse
import time

import torch

from edgekv import LLM
from edgekv.eval.data import read_documents, tokenize
from edgekv.llm import DEMO_MODEL_DIR


def nll(logits: torch.Tensor, targets: list[int]) -> float:
    """Mean negative log-likelihood of ``targets`` under ``logits`` (T, V)."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    return -lp[torch.arange(len(targets)), torch.tensor(targets)].mean().item()


def kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    """Mean KL(P || Q) over positions, P the reference."""
    lp, lq = (torch.log_softmax(x.float(), dim=-1) for x in (p_logits, q_logits))
    return (lp.exp() * (lp - lq)).sum(-1).mean().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", type=int, default=4, help="request length in contexts")
    ap.add_argument("--budget", type=int, default=256, help="max_kv_tokens")
    ap.add_argument("--policy", default="streaming")
    ap.add_argument("--formats", default="fp32,int8,int4")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = DEMO_MODEL_DIR
    common = dict(dtype=torch.float32, kv_memory="64MiB")
    probe = LLM(model, kv_format="fp32", **common)
    ctx = probe.model_config.max_position
    ids = tokenize(read_documents(model / "heldout.txt"), probe.tokenizer)
    n = args.contexts * ctx
    assert len(ids) > n, f"the held-out text has {len(ids)} tokens, {n + 1} needed"
    ids = ids[: n + 1]
    inputs, targets = ids[:-1], ids[1:]
    first, last = slice(0, ctx), slice(n - ctx, n)
    ref = probe.score(inputs[:ctx], chunk_size=1)  # no eviction, no shift
    print(f"model {model.name}: context {ctx}, request {n} tokens, {args.policy} budget "
          f"{args.budget}, token by token; reference (no eviction, first window): "
          f"ppl {torch.exp(torch.tensor(nll(ref, targets[first]))).item():.2f}")
    print(f"{'format':<7}{'shifts':>7}{'ppl first':>11}{'ppl last':>10}"
          f"{'KL first':>11}{'KL last':>10}{'s':>7}")
    exact = None
    for fmt in args.formats.split(","):
        llm = LLM(model, kv_format=fmt, eviction=args.policy, max_kv_tokens=args.budget,
                  **common)
        t0 = time.perf_counter()
        logits = llm.score(inputs, chunk_size=1)
        dt = time.perf_counter() - t0
        if fmt == "fp32":
            exact = logits
        ppl = [torch.exp(torch.tensor(nll(logits[w], targets[w]))).item()
               for w in (first, last)]
        kls = [kl(exact[w], logits[w]) if exact is not None else float("nan")
               for w in (first, last)]
        print(f"{fmt:<7}{llm.kv_stats()['context_shifts']:>7}{ppl[0]:>11.2f}{ppl[1]:>10.2f}"
              f"{kls[0]:>11.2e}{kls[1]:>10.2e}{dt:>7.1f}")


if __name__ == "__main__":
    main()
