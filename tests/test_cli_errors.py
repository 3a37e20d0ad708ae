"""A user's mistake on the command line is one line and exit code 2, never a traceback; in
the chat it is one line and the conversation goes on. Driven as a user meets it: through
a pipe, and through a pseudo-terminal for Ctrl-C."""

import io
import os
import pty
import re
import select
import subprocess
import sys
import time

import pytest
import torch

from edgekv.llm import DEMO_MODEL_DIR

FAST = ["--kv-memory", "16MiB", "--max-tokens", "8", "--temperature", "0"]


def run_cli(args, stdin=b"", timeout=300):
    return subprocess.run([sys.executable, "-m", "edgekv.cli", *args], input=stdin,
                          capture_output=True, timeout=timeout)


def one_line_error(r) -> str:
    """The error line of a run that must fail as a user's mistake."""
    err = r.stderr.decode("utf-8", "replace")
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert r.returncode == 2, err
    assert "Traceback" not in err and len(lines) == 1, err
    return lines[0]


def status_lines(out: str) -> list[str]:
    return [ln for ln in out.splitlines() if ln.startswith("[") and "tok/s" in ln]


# ---- broken models and bad options --------------------------------------------------------
@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    """Copies of the demo model, each broken one way (intact files are symlinks)."""
    root = tmp_path_factory.mktemp("broken")
    files = [f.name for f in DEMO_MODEL_DIR.iterdir()]

    def variant(name, drop=(), write=None):
        d = root / name
        d.mkdir()
        for f in files:
            if f not in drop and f not in (write or {}):
                (d / f).symlink_to(DEMO_MODEL_DIR / f)
        for f, data in (write or {}).items():
            (d / f).write_bytes(data)
        return d

    weights = (DEMO_MODEL_DIR / "model.safetensors").read_bytes()
    return {
        "truncated": variant("truncated", write={"model.safetensors": weights[: len(weights)
                                                                              // 3]}),
        "no_tokenizer": variant("no_tokenizer", drop=("tokenizer.json",
                                                      "tokenizer_config.json")),
        "bad_config": variant("bad_config", write={"config.json": b'{"architectures": ['}),
        "root": root,
    }


@pytest.mark.parametrize("case, args, stdin, message", [
    ("truncated", ["chat"], b"Hi\n", r"\S*truncated/model\.safetensors is truncated"),
    ("no_tokenizer", ["chat"], b"Hi\n", r"has no tokenizer: chat needs one"),
    ("no_tokenizer", ["generate", "Once upon a time"], b"", r"has no tokenizer: generate"),
    ("bad_config", ["chat"], b"Hi\n", r"cannot read \S*bad_config/config\.json: Expecting"),
    ("missing", ["chat"], b"Hi\n", r"'\S*/missing' is not a model directory"),
])
def test_a_broken_model_is_one_line_that_names_the_problem(case, args, stdin, message,
                                                             broken):
    model = broken[case] if case in broken else broken["root"] / case
    r = run_cli([*args, *FAST, "--model", str(model)], stdin)
    assert re.search(message, one_line_error(r)), r.stderr


@pytest.mark.parametrize("args, message", [
    (["chat", "--kv-memory", "lots"], "not a memory size: 'lots'"),
    (["chat", "--offload-memory", "lots"], "not a memory size: 'lots'"),
    (["serve", "--kv-memory", "lots"], "not a memory size: 'lots'"),
    (["chat", "--max-kv-tokens", "64"], "need --eviction"),
    (["chat", "--device", "gpu"], "unknown device 'gpu'"),
    (["generate", "   "], "the prompt is empty"),
])
def test_bad_options_are_one_line_before_the_model_loads(args, message):
    t0 = time.monotonic()
    r = run_cli([*args, "--model", str(DEMO_MODEL_DIR / "missing")])
    assert message in one_line_error(r)  # not the missing model: it was never read
    assert time.monotonic() - t0 < 120


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_on_a_cpu_only_machine_says_so():
    r = run_cli(["chat", "--device", "cuda", "--model", str(DEMO_MODEL_DIR / "missing")])
    line = one_line_error(r)
    assert f"CUDA is not available on this machine (torch {torch.__version__})" in line
    assert "--device cpu" in line


def test_a_prompt_longer_than_the_context_is_one_line():
    r = run_cli(["generate", *FAST], ("word " * 1500).encode())
    assert re.search(r"prompt of \d+ tokens does not fit the model's context of 1024 tokens",
                     one_line_error(r))
    assert r.stdout.strip() == b""


# ---- input that is not UTF-8 --------------------------------------------------------------
def test_chat_replaces_bytes_that_are_not_utf8_and_goes_on():
    r = run_cli(["chat", *FAST], b"caf\xe9 au lait\nHello there\n")
    out = r.stdout.decode()
    assert r.returncode == 0, r.stderr
    assert r.stderr.decode().strip() == ""
    assert out.count("(input was not valid UTF-8; replaced 1 byte)") == 1
    assert len(status_lines(out)) == 2  # both messages were answered


def test_generate_replaces_bytes_that_are_not_utf8():
    r = run_cli(["generate", *FAST], b"Once upon a time caf\xe9 ol\xe9")
    assert r.returncode == 0, r.stderr
    assert r.stderr.decode().splitlines() == ["(input was not valid UTF-8; replaced 2 bytes)"]
    assert r.stdout.strip()


def test_decode_counts_the_bytes_it_replaces():
    from edgekv.text_input import decode_utf8, reencode

    assert decode_utf8("naïve café".encode()) == ("naïve café", 0)
    assert decode_utf8(b"caf\xe9") == ("caf\ufffd", 1)
    text, n = decode_utf8(b"\xe2\x82 x \xff")  # a cut 3-byte sequence, then a stray byte
    assert n == 3 and text.endswith(" x \ufffd") and "\ufffd" in text[:2]
    assert reencode(b"ol\xe9".decode("utf-8", "surrogateescape")) == ("ol\ufffd", 1)


# ---- the chat survives a message it cannot take -------------------------------------------
@pytest.fixture(scope="module")
def demo_llm():
    from edgekv import LLM

    return LLM(kv_memory="16MiB", device="cpu")


def chat_transcript(llm, lines) -> list[str]:
    from edgekv import SamplingParams
    from edgekv.cli.repl import ChatREPL

    out = io.StringIO()
    ChatREPL(llm, SamplingParams(max_tokens=8, temperature=0.0), None, out=out).run(lines,
                                                                                  False)
    # status lines: the turn's own token counts (the blocks in use count other chats' too)
    return [re.sub(r"^\[.*(prompt \d+ \+ gen \d+ tokens).*$", r"\1", ln)
            for ln in out.getvalue().splitlines()]


def test_a_message_past_the_context_is_refused_and_the_chat_is_unchanged(demo_llm):
    plain = chat_transcript(demo_llm, ["Hello there", "What news?"])
    refused = chat_transcript(demo_llm, ["Hello there", "word " * 1500, "What news?"])
    error = [ln for ln in refused if ln.startswith("error:")]
    assert len(error) == 1 and "does not fit the model's context" in error[0]
    # the turn after the refused one is the same, token for token, as without it
    assert [ln for ln in refused if not ln.startswith("error:")] == plain


# ---- Ctrl-C on a terminal -----------------------------------------------------------------
class Terminal:
    """A child process on a pseudo-terminal: what it prints, and keys typed into it."""

    def __init__(self, args):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: the terminal is its controlling tty
            os.execv(sys.executable, [sys.executable, "-m", "edgekv.cli", *args])
        self.pending, self.code = "", None

    def read_until(self, needle: str, timeout: float = 60) -> str:
        end = time.monotonic() + timeout
        while needle not in self.pending:
            left = end - time.monotonic()
            ready = select.select([self.fd], [], [], max(left, 0))[0] if left > 0 else []
            if not ready:
                raise AssertionError(f"no {needle!r} after {timeout} s: {self.pending!r}")
            try:
                data = os.read(self.fd, 4096)
            except OSError:  # the child is gone
                data = b""
            if not data:
                raise AssertionError(f"ended before {needle!r}: {self.pending!r}")
            self.pending += data.decode("utf-8", "replace")
        i = self.pending.index(needle) + len(needle)
        seen, self.pending = self.pending[:i], self.pending[i:]
        return seen

    def type(self, keys: str) -> None:
        time.sleep(0.3)  # let the child settle into input() after printing the prompt
        os.write(self.fd, keys.encode())

    def exit_code(self, timeout: float = 30) -> int:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.code = os.waitstatus_to_exitcode(status)
                return self.code
            time.sleep(0.1)
        raise AssertionError(f"still running after {timeout} s: {self.pending!r}")

    def close(self) -> None:
        if self.code is None:
            os.kill(self.pid, 9)
            os.waitpid(self.pid, 0)
        os.close(self.fd)


@pytest.mark.parametrize("quit_keys", ["\x03", "\x04"], ids=["ctrl-c-twice", "ctrl-c-ctrl-d"])
def test_ctrl_c_at_the_prompt_drops_the_line_and_asks_before_quitting(quit_keys, demo_llm):
    term = Terminal(["chat", *FAST])
    try:
        term.read_until("you> ")
        term.type("half a thought\x03")  # Ctrl-C: the line is dropped, the chat goes on
        assert "(Ctrl-C again or Ctrl-D to quit)" in term.read_until("you> ", 20)
        term.type("Hello there\r")
        answered = term.read_until("you> ", 60).replace("\r", "")
        assert "model> " in answered and len(status_lines(answered)) == 1
        term.type("\x03")
        assert "(Ctrl-C again or Ctrl-D to quit)" in term.read_until("you> ", 20)
        term.type(quit_keys)  # a second Ctrl-C in a row, or Ctrl-D, quits
        assert term.exit_code() == 0
    finally:
        term.close()
    # the dropped words never reached the model: it answered "Hello there" alone
    reply, status = chat_transcript(demo_llm, ["Hello there"])
    assert f"model> {reply}\n" in answered and status in answered


# ---- edgekv eval checks its options before it loads anything ------------------------------
@pytest.mark.parametrize("args, message", [
    (["--json", "/nonexistent/rows.json"], "--json /nonexistent/rows.json: the folder"),
    (["--csv", "."], "--csv .: is a directory"),
    (["--device", "cuda"], "CUDA is not available"),
    (["--window", "64", "--stride", "128"], "stride (128) must not exceed the window (64)"),
    (["--text", "latin1.txt"], "latin1.txt as UTF-8 text"),
])
def test_eval_checks_its_options_before_it_loads_the_model(args, message, broken):
    """The model's weights are damaged: an error about them means the options were
    checked too late."""
    if "--device" in args and torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    (broken["root"] / "latin1.txt").write_bytes(b"caf\xe9 " * 500)
    r = subprocess.run([sys.executable, "-m", "edgekv.cli", "eval", "--model",
                        str(broken["truncated"]), "--peers", "none", *args],
                       capture_output=True, timeout=300, cwd=broken["root"])
    assert message in one_line_error(r)


# ---- library notices stay off the chat ----------------------------------------------------
def test_int8_weights_chat_prints_only_its_own_lines():
    pytest.importorskip("bitsandbytes")
    r = run_cli(["chat", *FAST, "--weights", "int8"], b"Hello there\n")
    assert r.returncode == 0, r.stderr
    assert r.stderr.decode().strip() == ""  # no notice about optional kernels
    out = r.stdout.decode().splitlines()
    assert len(out) == 2 and len(status_lines("\n".join(out))) == 1  # the reply, its status


@pytest.mark.parametrize("command", [["generate", "hi"], ["chat"]])
def test_ctrl_c_while_the_model_loads_leaves_quietly_with_130(command, monkeypatch):
    """Ctrl-C while loading exits as Ctrl-C while streaming does: 130, one line."""
    from click.testing import CliRunner

    from edgekv.cli import options
    from edgekv.cli.main import main

    def interrupted(opts, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(options, "build", interrupted)
    r = CliRunner().invoke(main, command, input="hello\n")
    assert r.exit_code == 130, r.output
    assert r.output.strip() == "interrupted"
