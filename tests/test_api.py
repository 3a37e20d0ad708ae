"""The public Python API: prompts of every kind, streaming, stops, chat, bad input."""

import json

import pytest
import torch

from edgekv import LLM, SamplingParams
from edgekv.engine.detokenizer import IncrementalDetokenizer

GREEDY = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(llama_dir):
    return LLM(llama_dir, kv_format="int8", kv_memory="8MiB", dtype="float32")


def test_generate_accepts_str_list_of_str_and_token_ids(llm):
    one = llm.generate("Once upon a time", GREEDY)
    assert len(one) == 1 and isinstance(one[0].text, str) and len(one[0].token_ids) == 20
    ids = llm.tokenizer.encode("Once upon a time")
    assert one[0].prompt_token_ids == ids
    by_ids = llm.generate([ids], GREEDY)[0]
    assert by_ids.token_ids == one[0].token_ids
    two = llm.generate(["Hello", "The quick brown fox"], GREEDY)
    assert [o.finish_reason for o in two] == ["length", "length"]
    assert two[0].text == llm.tokenizer.decode(two[0].token_ids, skip_special_tokens=True)
    assert llm.generate([], GREEDY) == []


def test_stream_yields_the_same_text_as_generate(llm):
    params = SamplingParams(max_tokens=30, temperature=0.8, seed=3, ignore_eos=True)
    pieces = list(llm.stream("café naïve", params))
    assert len(pieces) > 1
    assert "".join(pieces) == llm.generate("café naïve", params)[0].text


def test_incremental_detokenizer_never_splits_a_character(llm):
    text = " 日本語のテキスト 🙂 and ça, naïve — ok"
    ids = llm.tokenizer.encode(text)
    assert len(ids) > len(text.split())  # rare characters span several byte tokens
    detok = IncrementalDetokenizer(llm.tokenizer, [])
    pieces = [detok.step(ids[: i + 1]) for i in range(len(ids))]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text


def test_stop_string_cuts_the_text_and_reports_stop(llm):
    full = llm.generate("Hello", SamplingParams(max_tokens=30, temperature=0.0,
                                                ignore_eos=True))[0].text
    stop = full[5:8]
    assert len(stop) == 3 and stop not in full[:5 + 2]
    out = llm.generate("Hello", SamplingParams(max_tokens=30, temperature=0.0,
                                               ignore_eos=True, stop=[stop]))[0]
    assert out.finish_reason == "stop" and out.text == full[: full.index(stop)]
    streamed = "".join(llm.stream("Hello", SamplingParams(max_tokens=30, temperature=0.0,
                                                          ignore_eos=True, stop=[stop])))
    assert streamed == out.text


def test_eos_stops_generation(llm):
    eos = llm.tokenizer.eos_token_id
    out = llm.generate("Hello", SamplingParams(max_tokens=30, temperature=0.0,
                                               stop_token_ids=[eos]))[0]
    assert out.finish_reason in ("stop", "length")
    first = llm.generate("Hello", GREEDY)[0].token_ids
    # stopping at the first generated token id that we declare a stop token
    out = llm.generate("Hello", SamplingParams(max_tokens=30, temperature=0.0,
                                               stop_token_ids=[first[3]]))[0]
    assert out.finish_reason == "stop" and out.token_ids == first[: first.index(first[3]) + 1]


def test_chat_keeps_history_in_the_cache_and_prefills_only_the_new_turn(llm):
    chat = llm.chat(system="You are terse.")
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    r1 = chat.send("Hello there", params)
    cached = chat.num_cached_tokens
    assert cached > 0 and llm.kv_stats()["live_tokens"] >= cached
    prefilled = []
    orig = llm.engine.runner.run

    def spy(batch, all_logits=False):
        prefilled.append(sum(batch.num_new))
        return orig(batch, all_logits)

    llm.engine.runner.run = spy
    try:
        r2 = chat.send("And then?", params)
    finally:
        llm.engine.runner.run = orig
    prompt2 = chat.seq.token_ids[: chat.seq.num_prompt]
    assert prefilled[0] == len(prompt2) - cached  # only the new turn is prefilled
    assert "And then?" in llm.tokenizer.decode(prompt2[cached:])
    assert chat.num_cached_tokens > cached
    # the same reply as a fresh prefill of the same conversation tokens
    assert r2 == llm.generate([prompt2], params)[0].text and r1
    chat.reset()
    assert chat.num_cached_tokens == 0 and chat.messages == [chat.messages[0]]


def test_logprobs_are_the_models_own(llm):
    """Each output token's log-prob and the best alternatives are the log-softmax of the
    logits the model gives at that position (teacher-forced through the cache: score);
    greedy picks the best of them. Forked samples keep their own."""
    prompt = llm.encode("Once upon a time")
    out = llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0.0,
                                                ignore_eos=True, logprobs=3))[0].outputs[0]
    assert len(out.logprobs) == len(out.token_ids) == 8
    lp = torch.log_softmax(llm.score(prompt + out.token_ids), -1)
    for j, (tok, (chosen, alts)) in enumerate(zip(out.token_ids, out.logprobs, strict=True)):
        row = lp[len(prompt) - 1 + j]
        assert abs(chosen - row[tok].item()) < 1e-4
        assert [t for t, _ in alts] == row.topk(3).indices.tolist() and alts[0][0] == tok
        assert all(abs(v - row[t].item()) < 1e-4 for t, v in alts)
    two = llm.generate([prompt], SamplingParams(max_tokens=4, temperature=1.0, n=2, seed=3,
                                                logprobs=0))[0].outputs
    assert [len(o.logprobs) for o in two] == [len(o.token_ids) for o in two]
    assert all(alts == [] for o in two for _, alts in o.logprobs)
    assert llm.generate([prompt], GREEDY)[0].outputs[0].logprobs is None
    llm.check_integrity()


def test_sampling_params_validate():
    for bad in (dict(max_tokens=0), dict(temperature=-1), dict(top_p=0.0), dict(top_k=-2),
                dict(stop=[""]), dict(logprobs=-1), dict(logprobs=21)):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


def test_bad_input_is_a_clear_value_error(llama_dir, tmp_path, llm, monkeypatch):
    with pytest.raises(ValueError, match="not a model directory"):
        LLM(str(tmp_path / "missing"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="could not be fetched from the hub"):
        LLM("no-such-org/no-such-model")
    odd = tmp_path / "odd"
    odd.mkdir()
    cfg = json.loads((llama_dir / "config.json").read_text())
    cfg["architectures"] = ["FooForCausalLM"]
    (odd / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unsupported architecture 'FooForCausalLM'"):
        LLM(odd)
    with pytest.raises(ValueError, match="unknown KV format 'int3'"):
        LLM(llama_dir, kv_format="int3")
    with pytest.raises(ValueError, match="smaller than one"):
        LLM(llama_dir, kv_memory="1KiB")
    with pytest.raises(ValueError, match="memory size"):
        LLM(llama_dir, kv_memory="8 gigs")
    with pytest.raises(ValueError, match="does not fit the model's context of 512"):
        llm.generate([[5] * 600], GREEDY)
    with pytest.raises(ValueError, match="token ids must be in"):
        llm.generate([[5, 99999]], GREEDY)
    with pytest.raises(ValueError, match="at least one token"):
        llm.generate([[]], GREEDY)


@pytest.mark.parametrize("weights", ["int8", "nf4"])
def test_bitsandbytes_weights_generate(llama_dir, weights):
    ref = LLM(llama_dir, kv_format="fp16", kv_memory="4MiB", dtype="float32")
    q = LLM(llama_dir, kv_format="fp16", kv_memory="4MiB", dtype="float32", weights=weights)
    ids = [5, 17, 99, 3, 250, 41, 7, 8]
    lp, lq = ref.score(ids), q.score(ids)
    assert lq.shape == lp.shape and torch.isfinite(lq).all()
    assert (lp.softmax(-1) - lq.softmax(-1)).abs().sum(-1).max() < 0.5  # close, not equal
    assert len(q.generate([ids], GREEDY)[0].token_ids) == 20


def test_sharded_checkpoint_and_half_precision_weights(tmp_path):
    import transformers as tf

    from tiny_models import build_tokenizer, hf_config

    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(hf_config("qwen2"), dtype=torch.float32)
    model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="200KB")
    build_tokenizer().save_pretrained(tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    ids = [5, 17, 99, 3, 250, 41]
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0]
    full = LLM(tmp_path, kv_format="fp32", kv_memory="4MiB", dtype=torch.float32)
    assert (full.score(ids) - want).abs().max() <= 1e-4
    half = LLM(tmp_path, kv_format="bf16", kv_memory="4MiB", dtype="bfloat16")
    assert next(half.model.parameters()).dtype == torch.bfloat16
    assert (half.score(ids) - want).abs().max() <= 0.1
    assert len(half.generate([ids], GREEDY)[0].token_ids) == 20


def test_warm_up_runs_each_step_kind_and_leaves_no_trace(llama_dir, monkeypatch):
    """warm_up (a server's, before its first request) runs a prefill, a one-sequence
    decode and a two-sequence one, then leaves the cache empty and the counters as they
    were."""
    from edgekv.kernels import cpu_jit
    from edgekv.models import cpu_fused

    batches = []
    real = cpu_fused.compiled_layer
    monkeypatch.setattr(cpu_fused, "compiled_layer",
                        lambda qkv, *a: batches.append(qkv.shape[0]) or real(qkv, *a))
    llm = LLM(llama_dir, kv_format="int8", kv_memory="4MiB", dtype=torch.float32)
    llm.generate([list(range(3, 40))], SamplingParams(max_tokens=2))
    before, next_id = llm.kv_stats(), llm.engine._next_id
    llm.warm_up()
    after = llm.kv_stats()
    assert after["blocks_used"] == 0
    for key in ("preemptions", "prefix_query_tokens", "prefix_hit_tokens", "prefix_hit_rate",
                "cached_blocks"):
        assert after[key] == before[key], key
    assert llm.engine._next_id == next_id  # default seeds derive from request ids
    llm.check_integrity()
    if cpu_jit.available():
        assert 2 in batches  # the batched decode kernel ran (and is loaded)
