"""The interactive ``edgekv chat`` loop: streaming replies, a status line, slash commands.

On a terminal it prompts, streams each reply and prints a one-line status after it;
Ctrl-C stops the reply being generated; at the prompt it drops the line typed so far, and
a second Ctrl-C in a row quits, as do Ctrl-D and /exit. When stdin is not a terminal it
reads one message per line and prints one reply per message, for scripts. Input that is
not valid UTF-8 is read with its bad bytes replaced, and the chat says how many.
"""

from __future__ import annotations

import sys
import time

from edgekv.config import describe_kv
from edgekv.engine.sampling import SamplingParams
from edgekv.session.io import SessionExists, load_session, save_session
from edgekv.tables import text_table
from edgekv.text_input import decode_utf8, reencode, replaced_notice
from edgekv.units import human_bytes

INTERRUPTED = object()  # what stdin_lines yields for a Ctrl-C at the prompt

HELP = """commands:
  /help          this list
  /stats         full KV cache statistics
  /reset         forget the conversation (frees its KV blocks)
  /save PATH     save the conversation and its KV blocks (safetensors, checksummed)
  /save! PATH    the same, replacing PATH if it exists
  /load PATH     restore a saved conversation (same model, format and block size)
  /exit          quit (so do Ctrl-D and Ctrl-C twice; Ctrl-C stops a reply)"""


def status_line(stats: dict, tok_per_s: float, prompt_tokens: int, gen_tokens: int) -> str:
    return (f"[{tok_per_s:.1f} tok/s{dtype_note(stats)} | "
            f"prompt {prompt_tokens} + gen {gen_tokens} tokens | "
            f"KV {human_bytes(stats['bytes_used'])} / {human_bytes(stats['bytes_total'])} "
            f"{describe_kv(stats)}, {stats['bytes_per_token']:,} B/token | "
            f"blocks {stats['blocks_used']}/{stats['blocks_total']} | "
            f"util {stats['utilization']:.0%}{eviction_note(stats)}{exact_window_note(stats)}"
            f"{tier_note(stats)}]")


def tier_note(stats: dict) -> str:
    """Tokens and bytes in each age tier (kv_tiers)."""
    if not stats.get("tiers"):
        return ""
    return " | " + ", ".join(f"{t['format']} {t['live_tokens']:,} tok "
                             f"{human_bytes(t['bytes_used'])}" for t in stats["tiers"])


def dtype_note(stats: dict) -> str:
    dtype = stats.get("compute_dtype")  # the weights' dtype (LLM.compute_dtype)
    return f", {str(dtype).removeprefix('torch.')}" if dtype is not None else ""


def exact_window_note(stats: dict) -> str:
    if not stats.get("exact_window_tokens"):
        return ""
    return (f" | newest {stats['exact_window_tokens']} fp16: "
            f"{human_bytes(stats['exact_window_bytes'])}")


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
        self.interactive_prefix = ""  # "model> " before a reply on a terminal

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
            tiers = stats.pop("tiers", None) or []
            for line in text_table([(k, f"{v:.3f}" if isinstance(v, float) else str(v))
                                    for k, v in stats.items()], indent="  "):
                self.say(line)
            for t, tier in enumerate(tiers):  # bytes and tokens per age tier
                n = tier["tokens_max"]
                size = "older tokens" if n is None else \
                    f"{'newest' if t == 0 else 'next'} {n:,} tokens"
                self.say(f"  tier {t} {tier['format']} ({size}): "
                         f"{tier['live_tokens']:,} tokens, {tier['blocks_used']}/"
                         f"{tier['blocks_total']} blocks, {human_bytes(tier['bytes_used'])}"
                         f" / {human_bytes(tier['bytes_total'])}")
        elif cmd == "/reset":
            self.chat.reset()
            self.say("(conversation reset)")
        elif cmd in ("/save", "/save!", "/load") and not arg:
            self.say(f"usage: {cmd} PATH")
        elif cmd in ("/save", "/save!"):
            try:
                n = save_session(self.chat, arg, overwrite=cmd == "/save!")
                self.say(f"(saved {n} cached tokens to {arg})")
            except SessionExists:
                self.say(f"error: {arg} already exists; use /save! {arg} to overwrite it")
            except ValueError as e:
                self.say(f"error: {e}")
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
        """Stream the reply to one message, then the status line. Ctrl-C stops it; a
        message that cannot fit is one line, and the conversation is as it was."""
        t0 = time.perf_counter()
        stream = self.chat.stream(message, self.params)
        started = False
        try:
            for piece in stream:
                if not started:
                    started, t0 = True, time.perf_counter()  # decode speed: from here
                    self._dropped_notice()
                self.say(piece, end="")
        except ValueError as e:  # refused before it changed anything (chat.py), or cut
            if started:
                self.say()
            self.say(f"error: {e}")
            return
        except KeyboardInterrupt:
            stream.close()
            self.say(" [stopped]", end="")
        if not started:
            self._dropped_notice()
        dt = time.perf_counter() - t0
        self.say()
        seq = self.chat.seq
        if seq is not None and seq.finish_reason == "context":
            self.say(f"(the reply stopped at the model's context of "
                     f"{self.chat.context_limit()} tokens; the next turn drops the oldest "
                     f"turns, and --eviction goes on past it)")
        gen = seq.num_outputs if seq is not None else 0
        stats = {**self.llm.kv_stats(), "compute_dtype": self.llm.compute_dtype}
        self.say(status_line(stats, (gen - 1) / dt if gen > 1 and dt > 0 else 0.0,
                             self.chat.prompt_tokens, gen))

    def _dropped_notice(self) -> None:
        if self.chat.dropped_turns:
            n = self.chat.dropped_turns
            self.say(f"(dropped the {'oldest turn' if n == 1 else f'{n} oldest turns'} to "
                     f"fit the model's context of {self.chat.context_limit()} tokens)")
            self.say(self.interactive_prefix, end="")

    def run(self, lines, interactive: bool) -> None:
        """Answer the messages and commands of ``lines`` (str, or INTERRUPTED for a Ctrl-C
        at the prompt) until they end, /exit, or two Ctrl-C in a row."""
        it = iter(lines)
        interrupted = False
        while True:
            try:
                if interactive:
                    self.say("you> ", end="")
                line = next(it)
            except StopIteration:
                if interactive:
                    self.say()
                return
            except KeyboardInterrupt:  # between two reads: the same as at the prompt
                line = INTERRUPTED
            if line is INTERRUPTED:
                if interrupted or not interactive:
                    self.say()
                    return
                interrupted = True
                self.say("\n(Ctrl-C again or Ctrl-D to quit)")
                continue
            interrupted = False
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            try:
                if line.startswith("/"):
                    if not self.command(line):
                        return
                    continue
                self.interactive_prefix = "model> " if interactive else ""
                self.say(self.interactive_prefix, end="")
                self.reply(line)
            except KeyboardInterrupt:  # during a command or the status line: stop only it
                self.say(" (interrupted)")


def stdin_lines(interactive: bool, notify=None):
    """Lines from stdin, decoded as UTF-8 with invalid bytes replaced (``notify`` gets a
    one-line notice of how many). On a terminal, ``input()`` so that line editing works,
    and a Ctrl-C there yields INTERRUPTED instead of ending the lines."""
    if not interactive:
        for raw in sys.stdin.buffer:
            yield _checked(decode_utf8(raw), notify)
        return
    sys.stdin.reconfigure(errors="surrogateescape")  # input() keeps the bytes it can't read
    while True:
        try:
            line = input()
        except EOFError:
            return
        except KeyboardInterrupt:
            yield INTERRUPTED
            continue
        yield _checked(reencode(line), notify)


def _checked(decoded: tuple[str, int], notify) -> str:
    line, replaced = decoded
    if replaced and notify is not None:
        notify(replaced_notice(replaced))
    return line
