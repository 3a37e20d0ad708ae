"""A conversation never dies: `edgekv chat` through a pipe for three times the demo model's
1,024-token context, with eviction (the cache keeps its budget and shifts its positions)
and without (the oldest turns are dropped, with a notice)."""

import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

CONTEXT = 1024  # the bundled demo model's max_position_embeddings
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


def messages(count=40, words=40):
    """Lines of Shakespeare (the demo model's corpus), or made-up verse without it."""
    rng = random.Random(0)
    text = DATA.read_text().split() if DATA.is_file() else \
        ("thou art the king and I thy loyal servant " * 500).split()
    starts = [rng.randrange(len(text) - words) for _ in range(count)]
    return [" ".join(text[k : k + words]) for k in starts]


def chat(args, lines):
    return subprocess.run([sys.executable, "-m", "edgekv.cli", "chat", "--kv-memory", "16MiB",
                           "--max-tokens", "100", "--temperature", "0", *args],
                          input="\n".join(lines) + "\n", capture_output=True, text=True,
                          timeout=600)


def status(out):
    return [ln for ln in out.splitlines() if ln.startswith("[") and "tok/s" in ln]


def conversation_tokens(lines, out):
    from transformers import AutoTokenizer

    from edgekv.llm import DEMO_MODEL_DIR

    tok = AutoTokenizer.from_pretrained(str(DEMO_MODEL_DIR))
    sent = sum(len(tok.encode(m)) for m in lines)
    return sent + sum(int(re.search(r"gen (\d+) tokens", s).group(1)) for s in status(out))


@pytest.mark.parametrize("eviction", [True, False], ids=["eviction", "no-eviction"])
def test_a_chat_three_contexts_long_answers_every_turn(eviction):
    lines = messages()
    budget = 256
    args = ["--eviction", "streaming", "--max-kv-tokens", str(budget)] if eviction else []
    r = chat(args, lines)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    st = status(r.stdout)
    assert len(st) == len(lines)  # every turn answered
    assert conversation_tokens(lines, r.stdout) >= 3 * CONTEXT
    per_token = int(re.search(r"([\d,]+) B/token", st[0]).group(1).replace(",", ""))
    if eviction:
        for s in st:  # the KV bytes stay within the budget after every turn
            n, unit = re.search(r"KV ([\d.]+) (\w+) /", s).groups()
            used = float(n) * {"B": 1, "KiB": 1024, "MiB": 2**20}[unit]
            assert used <= budget * per_token, s
        evicted = int(re.search(r"evicted (\d+)", st[-1]).group(1))
        assert evicted >= 2 * CONTEXT
        assert "dropped" not in r.stdout
    else:
        drops = re.findall(r"\(dropped the (oldest turn|\d+ oldest turns) to fit the model's "
                           r"context of 1024 tokens\)", r.stdout)
        assert len(drops) >= 2
