"""`edgekv chat` and `edgekv generate` driven as a user scripts them: through a pipe."""

import re
import subprocess
import sys

import pytest


def run_cli(args, stdin="", timeout=300):
    return subprocess.run([sys.executable, "-m", "edgekv.cli", *args], input=stdin,
                          capture_output=True, text=True, timeout=timeout)


def status_lines(out):
    return [line for line in out.splitlines() if line.startswith("[") and "tok/s" in line]


@pytest.fixture(scope="module")
def model_args():
    """The bundled demo model: no --model, as a newcomer types it."""
    return ["--kv-memory", "16MiB", "--max-tokens", "12", "--temperature", "0"]


def test_chat_through_a_pipe_stats_save_exit(model_args, tmp_path):
    save = tmp_path / "s.safetensors"
    r = run_cli(["chat", *model_args],
                f"Hello there\nHow are you?\n/stats\n/save {save}\n/exit\nignored\n")
    assert r.returncode == 0, r.stderr
    status = status_lines(r.stdout)
    assert len(status) == 2  # a reply, then a status line, per message
    used = [int(re.search(r"blocks (\d+)/", s).group(1)) for s in status]
    kv = [re.search(r"KV ([\d.]+ \w+) /", s).group(1) for s in status]
    assert 0 < used[0] < used[1] and kv[0] != kv[1]  # KV usage grows with the second turn
    assert re.search(r"live_tokens\s+[1-9]", r.stdout)
    assert save.is_file() and "saved" in r.stdout


def test_save_then_load_continues_the_conversation_exactly(model_args, tmp_path):
    save = tmp_path / "s.safetensors"
    first = run_cli(["chat", *model_args], f"Hello there\n/save {save}\nWhat next?\n")
    assert first.returncode == 0, first.stderr
    continued = first.stdout.split("(saved")[1].split("\n", 1)[1]
    second = run_cli(["chat", *model_args], f"/load {save}\nWhat next?\n")
    assert second.returncode == 0, second.stderr
    assert "loaded" in second.stdout
    reply = lambda out: [ln for ln in out.splitlines() if ln and not ln.startswith(("[", "("))]  # noqa: E731
    assert reply(second.stdout) == reply(continued)
    # the turn after loading prefills only the new message, as the original process did
    prompt = [int(re.search(r"prompt (\d+) \+", s).group(1)) for s in
              (status_lines(continued)[0], status_lines(second.stdout)[0])]
    cached = int(re.search(r"loaded (\d+) cached", second.stdout).group(1))
    assert prompt[0] == prompt[1] < cached


def test_load_refuses_other_formats_and_damaged_files(model_args, tmp_path):
    save = tmp_path / "s.safetensors"
    run_cli(["chat", *model_args], f"Hello\n/save {save}\n")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(save.read_bytes()[: len(save.read_bytes()) // 2])
    other = [*model_args, "--kv", "int4"]
    r = run_cli(["chat", *other], f"/load {save}\n/load {bad}\n/load {tmp_path}/none\nHi\n")
    assert r.returncode == 0, r.stderr
    assert "kv_format='int8'" in r.stdout  # saved as int8, this chat runs int4
    assert "not a readable session file" in r.stdout or "damaged" in r.stdout
    assert "no such session file" in r.stdout
    assert len(status_lines(r.stdout)) == 1  # and the chat went on


def test_generate_prints_the_completion(model_args):
    r = run_cli(["generate", *model_args, "Once upon a time"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()
    piped = run_cli(["generate", *model_args], "Once upon a time")
    assert piped.stdout == r.stdout


def test_bad_options_exit_with_code_2(model_args):
    r = run_cli(["chat", "--model", "/nonexistent/model"])
    assert r.returncode == 2 and "not a model directory" in r.stderr
    r = run_cli(["chat", "--kv", "int3"])
    assert r.returncode == 2


def test_chat_with_eviction_stays_inside_its_budget(tmp_path):
    """A long piped chat with a 64-token budget: every status line shows the blocks in
    use within 4 blocks, and tokens evicted once the budget is full."""
    args = ["--kv-memory", "16MiB", "--max-tokens", "40", "--temperature", "0",
            "--eviction", "streaming", "--max-kv-tokens", "64"]
    r = run_cli(["chat", *args], "".join(f"Tell me more, part {i}.\n" for i in range(4)))
    assert r.returncode == 0, r.stderr
    status = status_lines(r.stdout)
    assert len(status) == 4
    assert all(int(re.search(r"blocks (\d+)/", s).group(1)) <= 4 for s in status)
    evicted = [int(re.search(r"streaming budget 64 tokens, evicted (\d+)", s).group(1))
               for s in status]
    assert evicted[-1] > 0 and evicted == sorted(evicted)


def test_bad_eviction_options_exit_with_code_2():
    r = run_cli(["chat", "--eviction", "lru"])
    assert r.returncode == 2 and "h2o" in r.stderr
    r = run_cli(["chat", "--max-kv-tokens", "64"])
    assert r.returncode == 2 and "need --eviction" in r.stderr
    r = run_cli(["chat", "--kv-memory", "16MiB", "--eviction", "h2o", "--max-kv-tokens", "64",
                 "--sink-tokens", "32", "--window-tokens", "32"])
    assert r.returncode == 2 and "budget is 4 blocks" in r.stderr


def test_chat_with_an_exact_window_shows_what_it_costs(model_args):
    r = run_cli(["chat", *model_args, "--kv", "int4", "--exact-window", "32"], "Hello there\n")
    assert r.returncode == 0, r.stderr
    (status,) = status_lines(r.stdout)
    assert re.search(r"newest 32 fp16: [\d.]+ \w+\]", status), status
