"""The interactive ``edgekv chat`` loop: streaming replies, a status line, slash commands.

On a terminal it prompts, streams each reply and prints a one-line status after it;
Ctrl-C stops the reply being generated, Ctrl-D or /exit quits. When stdin is not a
terminal it reads one message per line and prints one reply per message, for scripts.
"""

from __future__ import annotations

import sys
import time

from .sampling import SamplingParams
from .session_io import load_session, save_session

HELP = """commands:
  /help          this list
  /stats         full KV cache statistics
  /reset         forget the conversation (frees its KV blocks)
  /save PATH     save the conversation and its KV blocks (safetensors)
  /load PATH     restore a saved conversation (same model, format and block size)
  /exit          quit (Ctrl-D also quits; Ctrl-C stops a reply)"""


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def status_line(stats: dict, tok_per_s: float, prompt_tokens: int, gen_tokens: int) -> str:
    return (f"[{tok_per_s:.1f} tok/s{dtype_note(stats)} | "
            f"prompt {prompt_tokens} + gen {gen_tokens} tokens | "
            f"KV {human_bytes(stats['bytes_used'])} / {human_bytes(stats['bytes_total'])} "
            f"{stats['kv_format']}, {stats['bytes_per_token']:,} B/token | "
            f"blocks {stats['blocks_used']}/{stats['blocks_total']} | "
            f"util {stats['utilization']:.0%}{eviction_note(stats)}{residual_note(stats)}]")


def dtype_note(stats: dict) -> str:
    dtype = stats.get("compute_dtype")  # the weights' dtype (LLM.compute_dtype)
    return f", {str(dtype).removeprefix('torch.')}" if dtype is not None else ""


def residual_note(stats: dict) -> str:
    if not stats.get("residual_tokens"):
        return ""
    return (f" | newest {stats['residual_tokens']} fp16: "
            f"{human_bytes(stats['residual_bytes'])}")


def eviction_note(stats: dict) -> str:
    if not stats.get("eviction"):
        return ""
    return (f" | {stats['eviction']} budget {stats['max_kv_tokens']} tokens, "
            f"evicted {stats['evicted_tokens']}")


class ChatREPL:
    def __init__(self, llm, params: SamplingParams, system: str | None, out=None):
        self.llm, self.params = llm, params
        self.chat = llm.chat(system=system)
        self.out = out or sys.stdout

    def say(self, text: str = "", end: str = "\n") -> None:
        self.out.write(text + end)
        self.out.flush()

    def command(self, line: str) -> bool:
        """Run a slash command; False means quit."""
        cmd, _, arg = line.strip().partition(" ")
        arg = arg.strip()
        if cmd in ("/exit", "/quit"):
            return False
        if cmd == "/help":
            self.say(HELP)
        elif cmd == "/stats":
            stats = self.llm.kv_stats()
            stats["cached_tokens"] = self.chat.num_cached_tokens
            width = max(len(k) for k in stats)
            for k, v in stats.items():
                self.say(f"  {k:<{width}}  {v:.3f}" if isinstance(v, float) else
                         f"  {k:<{width}}  {v}")
        elif cmd == "/reset":
            self.chat.reset()
            self.say("(conversation reset)")
        elif cmd in ("/save", "/load") and not arg:
            self.say(f"usage: {cmd} PATH")
        elif cmd == "/save":
            n = save_session(self.chat, arg)
            self.say(f"(saved {n} cached tokens to {arg})")
        elif cmd == "/load":
            try:
                n = load_session(self.chat, arg)
                self.say(f"(loaded {n} cached tokens from {arg})")
            except ValueError as e:
                self.say(f"error: {e}")
        else:
            self.say(f"unknown command {cmd!r}; /help lists them")
        return True

    def reply(self, message: str) -> None:
        """Stream the reply to one message, then the status line. Ctrl-C stops it."""
        cached_before = self.chat.num_cached_tokens
        t0 = time.perf_counter()
        stream = self.chat.stream(message, self.params)
        try:
            for piece in stream:
                self.say(piece, end="")
        except KeyboardInterrupt:
            stream.close()
            self.say(" [stopped]", end="")
        dt = time.perf_counter() - t0
        self.say()
        seq = self.chat.seq
        gen = seq.num_outputs
        stats = {**self.llm.kv_stats(), "compute_dtype": getattr(self.llm, "compute_dtype", None)}
        self.say(status_line(stats, gen / dt if dt > 0 else 0.0,
                             seq.num_prompt - cached_before, gen))

    def run(self, lines, interactive: bool) -> None:
        it = iter(lines)
        while True:
            if interactive:
                self.say("you> ", end="")
            try:
                line = next(it)
            except StopIteration:
                if interactive:
                    self.say()
                return
            except KeyboardInterrupt:
                self.say()
                continue
            line = line.rstrip("\n")
            if not line.strip():
                continue
            if line.startswith("/"):
                if not self.command(line):
                    return
                continue
            if interactive:
                self.say("model> ", end="")
            self.reply(line)


def stdin_lines(interactive: bool):
    """Lines from stdin; on a terminal, ``input()`` so that line editing works."""
    if not interactive:
        yield from sys.stdin
        return
    while True:
        try:
            yield input()
        except EOFError:
            return
