"""Train the bundled demo model from scratch on the public-domain corpus in shared/data.

A byte-level BPE tokenizer and a small Llama (GQA, head_dim 128, tied embeddings) are
trained with a fixed seed; the last ``--holdout`` fraction of every corpus file is held
out and never trained on. The output is an HF-format directory that both EdgeKV and
transformers load: config.json, model.safetensors (fp16), tokenizer files with a chat
template, generation_config.json, a model card (README.md) and the held-out text.

    python scripts/train_demo_model.py --data ../shared/data --out edgekv/demo_model
    python scripts/train_demo_model.py --data ../shared/data --out /tmp/m --steps 3 --tiny

The chat template casts the conversation as a play: the user speaks as ROMEO, the model
answers as JULIET, and a turn ends at a blank line, as speeches do in the corpus.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

SPECIALS = ["<|endoftext|>", "<|pad|>"]
USER, BOT = "ROMEO", "JULIET"
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}" + USER + ":\n{{ m['content'] }}\n\n"
    "{% else %}" + BOT + ":\n{{ m['content'] }}\n\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}" + BOT + ":\n{% endif %}"
)
TURN_END = "\n\n"


def split_corpus(data: Path, holdout: float) -> tuple[list[str], list[str], list[str]]:
    """Every *.txt file: (names, training parts, held-out tails cut at a line boundary)."""
    names, train, held = [], [], []
    for f in sorted(data.glob("*.txt")):
        text = f.read_text(encoding="utf-8")
        cut = text.rfind("\n", 0, int(len(text) * (1 - holdout))) + 1
        names.append(f.name)
        train.append(text[:cut])
        held.append(text[cut:])
    if not names:
        raise SystemExit(f"no *.txt corpus files in {data}")
    return names, train, held


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=SPECIALS[0],
                                   bos_token=SPECIALS[0], pad_token=SPECIALS[1])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def encode_all(tok, texts: list[str]) -> np.ndarray:
    eot = tok.convert_tokens_to_ids(SPECIALS[0])
    ids: list[int] = []
    for t in texts:
        ids.extend(tok.encode(t, add_special_tokens=False))
        ids.append(eot)
    return np.asarray(ids, dtype=np.int32)


def model_config(vocab: int, context: int, tiny: bool):
    from transformers import LlamaConfig

    if tiny:  # for the test that proves the script runs
        dims = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=32)
    else:
        dims = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                    num_attention_heads=8, num_key_value_heads=2, head_dim=128)
    return LlamaConfig(vocab_size=vocab, max_position_embeddings=context, rms_norm_eps=1e-5,
                       tie_word_embeddings=True, bos_token_id=0, eos_token_id=0,
                       pad_token_id=1, rope_theta=10000.0, **dims)


@torch.no_grad()
def perplexity(model, ids: np.ndarray, window: int, max_windows: int) -> float:
    """exp(mean NLL) over consecutive non-overlapping windows of ``window`` tokens, each
    scored from its own start (no context carried over), fp32. Matches ``eval_ppl`` of the
    model card and tests/test_demo_model.py."""
    n = min((len(ids) - 1) // window, max_windows)
    total, count = 0.0, 0
    for i in range(n):
        x = torch.from_numpy(ids[i * window : (i + 1) * window + 1].astype(np.int64))
        logits = model(x[None, :-1]).logits[0].float()
        total += torch.nn.functional.cross_entropy(logits, x[1:], reduction="sum").item()
        count += window
    return math.exp(total / count)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, required=True, help="folder of corpus *.txt files")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (exact)")
    p.add_argument("--minutes", type=float, default=30.0,
                   help="without --steps: as many steps as fit in this time, measured on the "
                        "first steps (the card records the count; --steps N reproduces it)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--holdout", type=float, default=0.05)
    p.add_argument("--eval-windows", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-bf16", action="store_true", help="train in fp32 (slower)")
    p.add_argument("--tiny", action="store_true", help="a toy shape, for tests")
    a = p.parse_args(argv)
    from transformers import LlamaForCausalLM

    torch.manual_seed(a.seed)
    rng = np.random.default_rng(a.seed)
    t0 = time.time()
    names, train_texts, held_texts = split_corpus(a.data, a.holdout)
    tok = train_tokenizer(train_texts, a.vocab)
    train_ids = encode_all(tok, train_texts)
    held_ids = encode_all(tok, held_texts)
    print(f"corpus: {len(names)} files, {len(train_ids):,} training tokens, "
          f"{len(held_ids):,} held-out tokens, vocab {len(tok)}", flush=True)

    cfg = model_config(len(tok), a.context, a.tiny)
    model = LlamaForCausalLM(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=a.lr, betas=(0.9, 0.95))

    total = a.steps or 10**9  # set after the first steps when budgeted by time

    def lr_at(step: int) -> float:  # linear warmup, cosine decay to 10%
        if step < a.warmup:
            return a.lr * (step + 1) / a.warmup
        t = min(1.0, (step - a.warmup) / max(1, total - a.warmup))
        return a.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    model.train()
    t_train = time.time()
    step = 0
    while step < total:
        if a.steps is None and step == 8:
            per_step = (time.time() - t_train) / 8
            total = max(a.warmup + 1, int(a.minutes * 60 / per_step))
            print(f"{per_step:.2f} s/step: training {total} steps", flush=True)
        starts = rng.integers(0, len(train_ids) - a.context - 1, a.batch)
        batch = np.stack([train_ids[s : s + a.context + 1] for s in starts]).astype(np.int64)
        x = torch.from_numpy(batch)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not a.no_bf16):
            logits = model(x[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1),
                                                 x[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 25 == 0 or step == total - 1:
            rate = (step + 1) * a.batch * a.context / (time.time() - t_train)
            print(f"step {step:5d}/{total}  loss {loss.item():.3f}  lr {lr_at(step):.2e}  "
                  f"{rate:,.0f} tok/s  {(time.time() - t0) / 60:.1f} min", flush=True)
        step += 1
    a.steps = total
    train_minutes = (time.time() - t_train) / 60

    # ship fp16 weights, and report the perplexity of exactly those weights
    model.eval()
    model.half().float()
    ppl = perplexity(model, held_ids, a.context, a.eval_windows)
    print(f"held-out perplexity {ppl:.3f}", flush=True)

    out = a.out
    out.mkdir(parents=True, exist_ok=True)
    model.config.torch_dtype = "float16"
    model.half().save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    gen = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 1, "do_sample": True,
           "temperature": 0.8, "top_p": 0.95, "max_new_tokens": 128,
           "stop_strings": [TURN_END]}  # a chat turn ends at a blank line
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    (out / "heldout.txt").write_text("<|endoftext|>".join(held_texts), encoding="utf-8")
    card = {
        "data": names, "holdout_fraction": a.holdout, "seed": a.seed,
        "params": n_params, "steps": a.steps, "batch": a.batch, "context": a.context,
        "vocab": len(tok), "train_tokens_seen": a.steps * a.batch * a.context,
        "train_minutes": round(train_minutes, 1), "bf16_autocast": not a.no_bf16,
        "eval": {"windows": a.eval_windows, "window": a.context, "ppl": round(ppl, 4),
                 "text": "heldout.txt", "weights": "fp16"},
        "chat": {"user": USER, "assistant": BOT, "turn_end": TURN_END},
        "command": "python scripts/train_demo_model.py " + " ".join(
            sys.argv[1:] if argv is None else argv),
    }
    (out / "model_card.json").write_text(json.dumps(card, indent=2))
    (out / "README.md").write_text(model_card_text(card))
    return card


def model_card_text(c: dict) -> str:
    return f"""# EdgeKV demo model

A {c['params'] / 1e6:.1f}M-parameter Llama-architecture model trained from scratch by
`scripts/train_demo_model.py` so that EdgeKV works offline out of the box. It writes
Shakespeare-flavoured dialogue and 19th-century prose; it knows nothing else.

- Data: {', '.join(c['data'])} (public domain; shared/data). The last
  {c['holdout_fraction']:.0%} of every file is held out (heldout.txt), never trained on.
- Training: {c['steps']} steps of {c['batch']} x {c['context']} tokens
  ({c['train_tokens_seen']:,} tokens), AdamW (0.9, 0.95), weight decay 0.1, cosine
  schedule, bf16 autocast: {c['bf16_autocast']}, seed {c['seed']}, {c['train_minutes']}
  minutes on 2 CPU cores.
- Validation perplexity (fp16 weights, first {c['eval']['windows']} windows of
  {c['eval']['window']} tokens of heldout.txt, each window scored from its start):
  **{c['eval']['ppl']}**.
- Chat: the user speaks as {c['chat']['user']}, the model answers as
  {c['chat']['assistant']}; a turn ends at a blank line.
- Command: `{c['command']}`
"""


if __name__ == "__main__":
    main()
