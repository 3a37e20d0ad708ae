"""The chat API past the model's context: the oldest turns are dropped (and reported), a
message that cannot fit is a ValueError that leaves the conversation as it was, and with
eviction the conversation simply goes on."""

import pytest
import torch

from edgekv import LLM, SamplingParams

CTX = 512  # the tiny models' context
WORDS = "the quick brown fox jumps over a lazy dog once upon a time there was a cache".split()


def text(n_words, seed=0):
    g = torch.Generator().manual_seed(seed)
    return " ".join(WORDS[i] for i in torch.randint(len(WORDS), (n_words,), generator=g))


@pytest.fixture
def llm(llama_dir):
    return LLM(llama_dir, kv_format="int8", kv_memory="4MiB", dtype=torch.float32)


PARAMS = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


def test_the_oldest_turns_are_dropped_when_a_turn_would_not_fit(llm):
    chat = llm.chat(system="Be brief.")
    dropped = 0
    for i in range(30):
        chat.send(text(40, seed=i), PARAMS)
        dropped += chat.dropped_turns
        assert chat.seq.num_tokens <= CTX
        assert chat.messages[0] == {"role": "system", "content": "Be brief."}
        assert chat.messages[-1]["role"] == "assistant"
        llm.engine.manager.check_integrity()
    assert dropped > 0 and chat.total_dropped_turns == dropped
    # what remains is the newest turns, whole and in order
    users = [m["content"] for m in chat.messages if m["role"] == "user"]
    assert users == [text(40, seed=i) for i in range(30 - len(users), 30)]


def test_a_message_longer_than_the_context_is_an_error_and_changes_nothing(llm):
    chat = llm.chat()
    chat.send("Hello there", PARAMS)
    before = (list(chat.seq.token_ids), chat.seq.num_computed, list(chat.messages),
              list(llm.engine.manager.block_ids(chat.seq.seq_id)))
    with pytest.raises(ValueError, match="does not fit the model's context of 512 tokens"):
        chat.send(text(2000), PARAMS)
    after = (list(chat.seq.token_ids), chat.seq.num_computed, list(chat.messages),
             list(llm.engine.manager.block_ids(chat.seq.seq_id)))
    assert after == before
    llm.engine.manager.check_integrity()
    assert chat.send("And then?", PARAMS)  # the conversation goes on


def test_with_eviction_a_message_longer_than_the_context_streams_through(llama_dir):
    llm = LLM(llama_dir, kv_format="int8", kv_memory="4MiB", dtype=torch.float32,
              eviction="streaming", max_kv_tokens=128)
    chat = llm.chat()
    reply = chat.send(text(1500), PARAMS)
    assert chat.seq.num_outputs == 24 and reply
    assert chat.num_cached_tokens <= 128 and llm.kv_stats()["context_shifts"] >= 1
    chat.send("And then?", PARAMS)
    assert chat.dropped_turns == 0
    llm.engine.manager.check_integrity()


def test_ctrl_c_while_a_turn_is_set_up_records_an_empty_reply(llm, monkeypatch):
    """A real SIGINT while the turn is prepared is held back until the turn is queued
    whole; the turn then ends at once with an empty reply, and the chat goes on."""
    import os
    import signal

    chat = llm.chat()
    first = chat.send("Hello there", PARAMS)
    real = chat._turn

    def interrupted(*args):
        out = real(*args)
        os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(chat, "_turn", interrupted)
    with pytest.raises(KeyboardInterrupt):
        chat.send("Tell me about the quick brown fox", PARAMS)
    monkeypatch.undo()
    assert chat.messages[-2:] == [
        {"role": "user", "content": "Tell me about the quick brown fox"},
        {"role": "assistant", "content": ""}] and first
    assert chat.seq.num_prompt == chat.seq.num_tokens  # this turn's prompt, nothing more
    llm.check_integrity()
    assert chat.send("And then?", PARAMS)
    llm.check_integrity()


def test_each_turn_draws_its_own_samples_reproducibly(llama_dir):
    """One chat keeps one sequence, but every turn seeds its sampling apart (from the
    given seed and the turn's number), so a conversation replays exactly with the same
    seed and no two turns share a random stream."""
    p = SamplingParams(max_tokens=8, temperature=1.0, top_p=1.0, seed=1, ignore_eos=True)

    def seeds():
        chat = LLM(llama_dir, kv_format="int8", kv_memory="4MiB", dtype=torch.float32).chat()
        out = []
        for _ in range(3):
            chat.send("Hello there", p)
            out.append(chat.seq.seed)
        return out

    first = seeds()
    assert len(set(first)) == 3 and seeds() == first


def test_a_stream_cut_by_the_context_says_so(llm):
    prompt = [5] * (CTX - 4)
    for _ in llm.stream(prompt, SamplingParams(max_tokens=50, ignore_eos=True)):
        pass
    assert llm.last_finish_reason == "context"


def test_reset_while_a_reply_streams_stops_it_and_frees_its_blocks(llm, tmp_path):
    from edgekv.session.io import load_session, save_session

    chat = llm.chat(system="Be brief.")
    chat.send("Hello there", PARAMS)
    save_session(chat, tmp_path / "s.safetensors")
    stream = chat.stream("Tell me more", SamplingParams(max_tokens=40, ignore_eos=True))
    next(stream)
    with pytest.raises(ValueError, match="still being streamed"):
        load_session(chat, tmp_path / "s.safetensors")
    chat.reset()
    assert chat.messages == [{"role": "system", "content": "Be brief."}]
    assert llm.kv_stats()["blocks_used"] == 0
    stream.close()  # the old turn ends; it adds nothing to the chat
    assert chat.messages == [{"role": "system", "content": "Be brief."}]
    llm.check_integrity()
    assert chat.send("Hello again", PARAMS)
    llm.check_integrity()
