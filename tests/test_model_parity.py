"""Each model family over the paged cache matches transformers on the same checkpoint."""

import pytest
import torch
import transformers as tf

from edgekv import LLM, SamplingParams
from edgekv.engine.scheduler import ScheduledBatch

from tiny_models import FAMILIES


def hf_model(path):
    return tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def prompt(n=20, seed=1):
    return torch.randint(3, 320, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers_over_prompt_and_decode_steps(family, tiny_model_dirs):
    path = tiny_model_dirs[family]
    ids = prompt(20) + prompt(16, seed=2)
    with torch.no_grad():
        want = hf_model(path)(torch.tensor([ids])).logits[0].float()  # (36, vocab)
    llm = LLM(path, kv_format="fp32", kv_memory="4MiB", dtype=torch.float32)
    if family == "llama3":
        assert llm.model_config.rope_scaling["rope_type"] == "llama3"
    # the prompt as one prefill, then 16 tokens one at a time through the decode path
    seq = llm.engine.new_sequence(ids, SamplingParams(max_tokens=1))
    logits = []
    for n in [20] + [1] * 16:
        _, copies = llm.engine.manager.append_slots(seq.seq_id, n)
        llm.engine.cache.copy_blocks(copies)
        out, _ = llm.engine.runner.run(ScheduledBatch([seq], [n]), all_logits=True)
        seq.num_computed += n
        logits.append(out)
    got = torch.cat(logits)
    assert (got - want).abs().max() <= 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_is_token_identical_to_transformers(family, tiny_model_dirs):
    path = tiny_model_dirs[family]
    ids = prompt(24, seed=3)
    ref = hf_model(path)
    ref.generation_config.eos_token_id = None  # like ignore_eos: EOS may be generated
    with torch.no_grad():
        want = ref.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False,
                            pad_token_id=0)[0, 24:].tolist()
    assert len(want) == 32
    llm = LLM(path, kv_format="fp16", kv_memory="4MiB", dtype=torch.float32)
    out = llm.generate([ids], SamplingParams(max_tokens=32, temperature=0.0,
                                             ignore_eos=True))[0]
    assert out.token_ids == want
    assert out.finish_reason == "length"


def test_score_token_by_token_equals_one_prefill(llama_dir):
    llm = LLM(llama_dir, kv_format="fp32", kv_memory="4MiB", dtype=torch.float32)
    ids = prompt(40, seed=4)
    assert torch.allclose(llm.score(ids, chunk_size=1), llm.score(ids), atol=1e-4)
    assert llm.kv_stats()["blocks_used"] == 0  # scoring frees its blocks
