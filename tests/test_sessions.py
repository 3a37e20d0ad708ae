"""Session files a user can trust: a damaged, foreign or impossible file is refused with a
line naming the check it failed, and the live conversation is then exactly as it was (its
tokens, blocks, messages, the pool, its next reply); saving is atomic and never kills the
chat. Driven through the Python API on a tiny model, and through `edgekv chat`."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from edgekv import LLM, SamplingParams
from edgekv.session import io as session_io
from edgekv.session.check import session_checksum
from edgekv.session.io import SessionExists, load_session, save_session

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
KW = dict(kv_format="int8", dtype=torch.float32, block_size=8)
LIVE_BLOCKS = 12  # the live chat's pool: its conversation fits, the donor's does not
DONOR_TURNS = ["Once upon a time there was a small cache.", "The quick brown fox jumps.",
               "Hello! How are you today?", "It held many keys and values."]


def per_block(llama_dir) -> int:
    return LLM(llama_dir, kv_memory="1MiB", **KW).cache_config.bytes_per_block


def live_chat(llama_dir, blocks: int = LIVE_BLOCKS, turns=("Hello",)):
    """A chat ``turns`` in, on a pool of ``blocks`` blocks."""
    llm = LLM(llama_dir, kv_memory=blocks * per_block(llama_dir), **KW)
    chat = llm.chat()
    for turn in turns:
        chat.send(turn, GREEDY)
    return chat


def snapshot(chat) -> dict:
    """Everything a failed load must leave as it was."""
    llm, seq = chat.llm, chat.seq
    mgr = llm.engine.manager
    ids = list(mgr.tables[seq.seq_id].block_ids)
    layer = llm.engine.cache.layers[0][0]
    return dict(seq=seq, tokens=list(seq.token_ids), computed=seq.num_computed, blocks=ids,
                messages=copy.deepcopy(chat.messages), prompt_text=chat._prompt_text,
                used=llm.kv_stats()["blocks_used"], free=mgr.pool.free_ids,
                data=layer.data[ids].clone(), scale=layer.scale[ids].clone())


def assert_unchanged(chat, before: dict, free_order: bool = True) -> None:
    """``free_order``: the pool's free list in the same order, not just the same blocks."""
    after = snapshot(chat)
    if not free_order:
        before = {**before, "free": sorted(before["free"])}
        after["free"] = sorted(after["free"])
    assert after.pop("seq") is before["seq"]
    for key in ("data", "scale"):
        assert torch.equal(after.pop(key), before[key])
    assert after == {k: v for k, v in before.items() if k not in ("seq", "data", "scale")}
    chat.llm.engine.manager.check_integrity()


@pytest.fixture(scope="module")
def expected_reply(llama_dir):
    """The live chat's second reply when nothing happens between its turns."""
    return live_chat(llama_dir).send("How are you?", GREEDY)


@pytest.fixture(scope="module")
def donor(llama_dir, tmp_path_factory):
    """A valid session of a longer conversation (same model, format and block size), and
    that conversation's next reply."""
    llm = LLM(llama_dir, kv_memory="1MiB", **KW)
    chat = llm.chat(system="Be brief.")
    for turn in DONOR_TURNS:
        chat.send(turn, GREEDY)
    path = tmp_path_factory.mktemp("donor") / "donor.safetensors"
    saved = save_session(chat, path)
    nb = len(llm.engine.manager.tables[chat.seq.seq_id].block_ids)
    assert nb > LIVE_BLOCKS
    return dict(path=path, cached=saved, blocks=nb, next=chat.send("And then?", GREEDY))


# ---- crafting files ----------------------------------------------------------------------
def read(path: Path) -> tuple[dict, dict]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}


def rewrite(src: Path, dst: Path, edit, checksum: bool = True) -> Path:
    """Copy ``src`` with ``edit(meta, tensors)`` applied; with a recomputed checksum, so a
    later check meets the edit on its own."""
    meta, tensors = read(src)
    edit(meta, tensors)
    if checksum:
        meta["checksum"] = session_checksum(tensors, meta)
    save_file(tensors, str(dst), metadata=meta)
    return dst


def write(dst: Path, data: bytes) -> Path:
    dst.write_bytes(data)
    return dst


def flip_bit(src: Path, dst: Path, offset: int) -> Path:
    data = bytearray(src.read_bytes())
    data[offset] ^= 0x01
    dst.write_bytes(bytes(data))
    return dst


def tensor_offset(path: Path, name: str) -> int:
    """Offset in the file of the first byte of tensor ``name``."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return 8 + n + json.loads(data[8 : 8 + n])[name]["data_offsets"][0]


def header_offset(path: Path, text: bytes) -> int:
    data = path.read_bytes()
    at = data.index(text)
    assert at < 8 + int.from_bytes(data[:8], "little")  # inside the JSON header
    return at


def set_meta(**kv):
    return lambda meta, tensors: meta.update(kv)


def set_tensor(name, index, value):
    return lambda meta, tensors: tensors[name].__setitem__(index, value)


BAD_FILES = {  # case -> (make(donor, dst), the words its refusal must say)
    "truncated": (lambda d, p: write(p, d.read_bytes()[: d.stat().st_size // 2]),
                  "is truncated or not a readable session file"),
    "bit-flipped header": (lambda d, p: flip_bit(d, p, header_offset(d, b"quick")),
                           "fails its checksum"),
    "bit-flipped token ids": (lambda d, p: flip_bit(d, p, tensor_offset(d, "tokens") + 8),
                              "fails its checksum"),
    "flipped KV bytes": (lambda d, p: flip_bit(d, p, tensor_offset(d, "L1.v.data") + 5),
                         "fails its checksum"),
    "flipped scales": (lambda d, p: flip_bit(d, p, tensor_offset(d, "L0.k.scale") + 2),
                       "fails its checksum"),
    "not a session": (lambda d, p: save_file({"x": torch.zeros(2)}, str(p)) or p,  # None
                      "is not an EdgeKV session file"),
    "older version": (lambda d, p: rewrite(d, p, set_meta(format="edgekv-session-1")),
                      "written by an older version of EdgeKV"),
    "wrong model": (lambda d, p: rewrite(d, p, set_meta(model="0123456789abcdef")),
                    "saved with another model"),
    "wrong kv format": (lambda d, p: rewrite(d, p, set_meta(kv_format="int4")),
                        "saved with kv_format='int4'; this session uses 'int8'"),
    "wrong block size": (lambda d, p: rewrite(d, p, set_meta(block_size="16")),
                         "saved with block_size='16'; this session uses '8'"),
    "NaN scale": (lambda d, p: rewrite(d, p, set_tensor("L1.k.scale", (0, 1, 2), float("nan"))),
                  "non-finite or non-positive KV scale (L1.k.scale)"),
    "zero scale": (lambda d, p: rewrite(d, p, set_tensor("L0.v.scale", (1, 0, 3), 0.0)),
                   "non-finite or non-positive KV scale (L0.v.scale)"),
    "out-of-range token": (lambda d, p: rewrite(d, p, set_tensor("tokens", 3, 320)),
                           "holds token id 320, outside this model's vocabulary [0, 320)"),
    "bad messages": (lambda d, p: rewrite(d, p, set_meta(messages=json.dumps(
        [{"role": "robot", "content": "beep"}]))), "has bad messages"),
    "inconsistent counts": (lambda d, p: rewrite(d, p, set_meta(num_computed="100000")),
                            "is inconsistent: counts computed=100000"),
    "missing blocks": (lambda d, p: rewrite(d, p, lambda m, t: t.pop("L1.k.data")),
                       "is inconsistent: L1.k.data is missing"),
    "does not fit": (lambda d, p: write(p, d.read_bytes()),
                     "does not fit in the KV pool"),
}


def test_each_refusal_names_its_own_cause():
    causes = [words for _, words in BAD_FILES.values() if words != "fails its checksum"]
    assert len(set(causes)) == len(causes)


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_a_refused_load_leaves_the_conversation_as_it_was(case, llama_dir, donor, tmp_path,
                                                          expected_reply):
    make, words = BAD_FILES[case]
    bad = make(donor["path"], tmp_path / "bad.safetensors")
    chat = live_chat(llama_dir)
    before = snapshot(chat)
    with pytest.raises(ValueError) as e:
        load_session(chat, bad)
    message = str(e.value)
    assert words in message and "\n" not in message and str(bad) in message
    assert_unchanged(chat, before)
    assert chat.send("How are you?", GREEDY) == expected_reply
    chat.llm.engine.manager.check_integrity()


def test_missing_file_and_directory_are_refused(llama_dir, tmp_path):
    chat = live_chat(llama_dir)
    before = snapshot(chat)
    with pytest.raises(ValueError, match="no such session file"):
        load_session(chat, tmp_path / "none.safetensors")
    with pytest.raises(ValueError, match="is a directory, not a session file"):
        load_session(chat, tmp_path)
    assert_unchanged(chat, before)


def test_paths_the_os_will_not_look_at_are_one_line_errors(llama_dir, tmp_path):
    chat = live_chat(llama_dir)
    before = snapshot(chat)
    for bad in (tmp_path / ("a" * 300) / "x", Path("~no_such_user_edgekv/x")):
        with pytest.raises(ValueError, match="cannot (save to|load)"):
            save_session(chat, bad)
        with pytest.raises(ValueError, match="cannot (save to|load)|no such session"):
            load_session(chat, bad)
    assert_unchanged(chat, before)


def test_loading_a_session_brings_its_system_prompt(llama_dir, tmp_path):
    src = LLM(llama_dir, kv_memory="1MiB", **KW).chat(system="Be brief.")
    src.send("Hello", GREEDY)
    save_session(src, tmp_path / "s.safetensors")
    chat = live_chat(llama_dir)  # a chat without a system prompt
    load_session(chat, tmp_path / "s.safetensors")
    assert chat.system == "Be brief."
    chat.reset()
    assert chat.messages == [{"role": "system", "content": "Be brief."}]
    plain = live_chat(llama_dir)
    save_session(plain, tmp_path / "plain.safetensors")
    load_session(chat, tmp_path / "plain.safetensors")
    assert chat.system is None
    chat.reset()
    assert chat.messages == []


def test_a_session_that_fits_only_in_the_chats_own_blocks_loads_and_continues(llama_dir,
                                                                              donor):
    """The pool has room for the donor's blocks and its next turn, but the live chat holds
    some of them: they count as room, since replacing the conversation frees them."""
    chat = live_chat(llama_dir, blocks=donor["blocks"] + 3, turns=DONOR_TURNS[:3])
    mgr = chat.llm.engine.manager
    assert mgr.pool.num_free < donor["blocks"]
    assert load_session(chat, donor["path"]) == donor["cached"]
    mgr.check_integrity()
    assert mgr.pool.num_used == donor["blocks"] == len(mgr.tables[chat.seq.seq_id].block_ids)
    assert chat.send("And then?", GREEDY) == donor["next"]


def test_a_failure_while_installing_restores_the_conversation(llama_dir, donor, monkeypatch,
                                                              expected_reply):
    """Writing the bytes never fails in practice; if it does, what was taken is given back
    (to the free list's tail: its order is the only change). With room to spare the old
    conversation keeps its blocks throughout."""
    def boom(*args):
        raise RuntimeError("device lost")

    monkeypatch.setattr(session_io, "_write_blocks", boom)
    chat = live_chat(llama_dir, blocks=4 * donor["blocks"])
    before = snapshot(chat)
    with pytest.raises(RuntimeError, match="device lost"):
        load_session(chat, donor["path"])
    assert_unchanged(chat, before, free_order=False)
    assert chat.send("How are you?", GREEDY) == expected_reply


def test_a_failure_after_freeing_the_chats_blocks_keeps_the_conversation(llama_dir, donor,
                                                                         monkeypatch,
                                                                         expected_reply):
    """When only the chat's own blocks make room they are freed first; a failure then keeps
    the conversation (tokens, messages), whose cache is recomputed on the next turn."""
    monkeypatch.setattr(session_io, "_write_blocks", lambda *a: 1 / 0)
    chat = live_chat(llama_dir, blocks=donor["blocks"])
    seq, tokens, messages = chat.seq, list(chat.seq.token_ids), copy.deepcopy(chat.messages)
    with pytest.raises(ZeroDivisionError):
        load_session(chat, donor["path"])
    assert chat.seq is seq and seq.token_ids == tokens and chat.messages == messages
    assert chat.llm.kv_stats()["blocks_used"] == 0  # nothing leaked
    chat.llm.engine.manager.check_integrity()
    assert chat.send("How are you?", GREEDY) == expected_reply


@pytest.mark.parametrize("kv_format", ["fp16", "bf16", "fp8", "int4", "int4_nl"])
def test_every_format_round_trips_and_its_zero_points_are_checked(kv_format, llama_dir,
                                                                  tmp_path):
    """Checksums cover every storage dtype (fp8, bf16 bytes); int4's zero points must be
    finite; the codebook's signed scales load, and a zero one is refused."""
    kw = {**KW, "kv_format": kv_format}
    llm = LLM(llama_dir, kv_memory="1MiB", **kw)
    chat = llm.chat()
    chat.send("Hello", GREEDY)
    path = tmp_path / "s.safetensors"
    n = save_session(chat, path)
    want = chat.send("How are you?", GREEDY)
    other = LLM(llama_dir, kv_memory="1MiB", **kw).chat()
    assert load_session(other, path) == n
    assert other.send("How are you?", GREEDY) == want
    meta, tensors = read(path)
    if "L0.k.zero" in tensors:
        bad = rewrite(path, tmp_path / "bad.safetensors",
                      set_tensor("L0.k.zero", (0, 0, 0), float("inf")))
        with pytest.raises(ValueError, match=r"non-finite KV zero point \(L0.k.zero\)"):
            load_session(other, bad)
    else:
        assert kv_format != "int4"
    if kv_format == "int4_nl":  # signed: the file holds negative scales, and loaded
        assert bool((tensors["L0.k.scale"].float() < 0).any())
        bad = rewrite(path, tmp_path / "zero.safetensors", set_tensor("L0.k.scale", (0, 0, 0), 0.0))
        with pytest.raises(ValueError, match=r"non-finite or zero KV scale \(L0.k.scale\)"):
            load_session(other, bad)
    other.llm.engine.manager.check_integrity()


# ---- saving ------------------------------------------------------------------------------
def no_temp_files(directory: Path) -> bool:
    return not [p for p in directory.iterdir() if p.name.startswith(".")]


def test_save_refuses_a_directory_a_missing_directory_and_an_existing_file(llama_dir,
                                                                           tmp_path):
    chat = live_chat(llama_dir)
    with pytest.raises(ValueError, match="is a directory; name a file"):
        save_session(chat, tmp_path)
    with pytest.raises(ValueError, match="nope does not exist"):
        save_session(chat, tmp_path / "nope" / "s.safetensors")
    (tmp_path / "f").write_text("a file")
    with pytest.raises(ValueError, match="f is not a directory"):
        save_session(chat, tmp_path / "f" / "s.safetensors")
    path = tmp_path / "s.safetensors"
    path.write_text("precious")
    with pytest.raises(SessionExists, match="already exists"):
        save_session(chat, path)
    assert path.read_text() == "precious"
    assert save_session(chat, path, overwrite=True) == chat.num_cached_tokens
    other = live_chat(llama_dir)
    assert load_session(other, path) == chat.num_cached_tokens
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f", "s.safetensors"]


def test_save_and_load_expand_the_home_directory(llama_dir, tmp_path, monkeypatch,
                                                 expected_reply):
    monkeypatch.setenv("HOME", str(tmp_path))
    chat = live_chat(llama_dir)
    n = save_session(chat, "~/s.safetensors")
    assert (tmp_path / "s.safetensors").is_file()
    other = live_chat(llama_dir)
    other.reset()
    assert load_session(other, "~/s.safetensors") == n
    assert other.send("How are you?", GREEDY) == expected_reply


def test_a_failed_write_leaves_no_file_and_the_old_one_intact(llama_dir, tmp_path,
                                                              monkeypatch):
    """A read-only directory (or a full disk) makes the write fail: one ValueError line, no
    temporary file left, an existing target untouched."""
    chat = live_chat(llama_dir)
    path = tmp_path / "s.safetensors"
    save_session(chat, path)
    old = path.read_bytes()
    chat.send("How are you?", GREEDY)

    def refuse(src, dst):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(session_io.os, "replace", refuse)
    with pytest.raises(ValueError, match=r"cannot save to .*: Permission denied$"):
        save_session(chat, path, overwrite=True)
    with pytest.raises(ValueError, match="cannot save to"):
        save_session(chat, tmp_path / "new.safetensors")
    assert path.read_bytes() == old and no_temp_files(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["s.safetensors"]
    # a read-only directory refuses the temporary file itself
    monkeypatch.setattr(session_io.tempfile, "mkstemp", lambda **kw: refuse(None, None))
    with pytest.raises(ValueError, match=r"cannot save to .*: Permission denied$"):
        save_session(chat, path, overwrite=True)
    assert path.read_bytes() == old and no_temp_files(tmp_path)


def test_save_into_a_read_only_directory(llama_dir, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as root: a read-only mode does not stop writes")
        chat = live_chat(llama_dir)
        with pytest.raises(ValueError, match="cannot save to .*Permission denied"):
            save_session(chat, ro / "s.safetensors")
        assert not list(ro.iterdir())
    finally:
        ro.chmod(0o700)


def test_the_checksum_covers_tokens_kv_bytes_and_metadata(llama_dir, donor):
    meta, tensors = read(donor["path"])
    want = session_checksum(tensors, meta)
    assert meta["checksum"] == want
    for name in ("tokens", "L0.k.data", "L1.v.scale", "eviction_scores"):
        if name in tensors:
            t = {**tensors, name: tensors[name].clone()}
            t[name].view(-1)[0] += 1
            assert session_checksum(t, meta) != want, name
    for key in ("model", "num_computed", "num_prompt", "messages", "prompt_text"):
        assert session_checksum(tensors, {**meta, key: meta[key] + "x"}) != want, key


# ---- through the CLI ---------------------------------------------------------------------
CLI_ARGS = ["--kv-memory", "16MiB", "--max-tokens", "8", "--temperature", "0"]


def run_chat(stdin: str, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "edgekv.cli", "chat", *CLI_ARGS], input=stdin,
                          capture_output=True, text=True, timeout=300, env=env)


def replies(out: str) -> list[str]:
    return [ln for ln in out.splitlines()
            if ln and not ln.startswith(("[", "(", "error:"))]


def test_cli_save_failures_are_one_line_and_the_chat_goes_on(tmp_path):
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    s = work / "s.safetensors"
    want = run_chat("Hello\nHow are you?\n", home)
    r = run_chat(f"Hello\n/save {work}/nope/s.safetensors\n/save {work}\n/save ~/x.safetensors\n"
                 f"/save {s}\n/save {s}\n/save! {s}\nHow are you?\n", home)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    errors = [ln for ln in r.stdout.splitlines() if ln.startswith("error:")]
    assert len(errors) == 3
    assert f"{work}/nope does not exist" in errors[0]
    assert "is a directory" in errors[1]
    assert errors[2] == f"error: {s} already exists; use /save! {s} to overwrite it"
    assert r.stdout.count("(saved ") == 3  # ~/x, the first /save, then /save!
    assert (home / "x.safetensors").is_file() and s.is_file()
    assert no_temp_files(home) and sorted(p.name for p in work.iterdir()) == ["s.safetensors"]
    assert replies(r.stdout) == replies(want.stdout)  # the conversation went on unchanged


def test_cli_refuses_a_damaged_session_and_the_chat_goes_on(tmp_path):
    s = tmp_path / "s.safetensors"
    first = run_chat(f"Once upon a time\n/save {s}\n", tmp_path)
    assert first.returncode == 0 and s.is_file(), first.stderr
    bad = flip_bit(s, tmp_path / "bad.safetensors", tensor_offset(s, "L0.k.data") + 7)
    want = run_chat("Hello\nHow are you?\n", tmp_path)
    r = run_chat(f"Hello\n/load {bad}\nHow are you?\n", tmp_path)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert f"error: {bad} fails its checksum: the file is damaged" in r.stdout.splitlines()
    assert replies(r.stdout) == replies(want.stdout)


def test_cli_save_into_a_read_only_directory(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as root: a read-only mode does not stop writes "
                        "(test_a_failed_write_leaves_no_file_and_the_old_one_intact covers it)")
        r = run_chat(f"Hello\n/save {ro}/s.safetensors\nHow are you?\n", tmp_path)
        assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
        assert f"error: cannot save to {ro}/s.safetensors: Permission denied" in r.stdout
        assert len([ln for ln in r.stdout.splitlines() if "tok/s" in ln]) == 2
        assert not list(ro.iterdir())
    finally:
        ro.chmod(0o700)
