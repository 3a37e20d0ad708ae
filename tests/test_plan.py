"""The memory planner (edgekv.plan), ``edgekv plan``, and the auto-sized KV pool of LLM.

Numbers are checked against ones computed by hand from the published shapes.
"""

import json
import logging

import pytest
import torch
from click.testing import CliRunner

from edgekv import LLM, CacheConfig
from edgekv.cache.memory import auto_kv_plan
from edgekv.cli.main import main
from edgekv.plan import (
    KNOWN_MODELS,
    config_from_hf_dict,
    kv_capacity,
    num_params,
    plan_memory,
    resolve_model,
    weight_memory,
)
from edgekv.plan.headroom import CUDA_CONTEXT_BYTES
from edgekv.plan.weights import int8_bytes, nf4_bytes
from edgekv.quant import get_format

GiB = 2**30


# ---- shipped configs --------------------------------------------------------------------------
@pytest.mark.parametrize("name, params", [
    ("llama-3.2-1b", 1_235_814_400), ("llama-3.2-3b", 3_212_749_824),
    ("llama-3.1-8b", 8_030_261_248), ("qwen2.5-0.5b", 494_032_768),
    ("qwen2.5-1.5b", 1_543_714_304), ("qwen2.5-7b", 7_615_616_512),
    ("mistral-7b", 7_241_732_096),
])
def test_shipped_configs_give_the_published_parameter_counts(name, params):
    assert num_params(resolve_model(name).config) == params  # 1.24B ... 7.24B as published


@pytest.mark.parametrize("model, name", [
    ("LLAMA-3.2-3B", "llama-3.2-3b"),
    ("meta-llama/Llama-3.2-3B-Instruct", "llama-3.2-3b"),
    ("meta-llama/Meta-Llama-3.1-8B-Instruct", "llama-3.1-8b"),
    ("Qwen/Qwen2.5-7B-Instruct", "qwen2.5-7b"),
    ("mistralai/Mistral-7B-v0.1", "mistral-7b"),
])
def test_names_and_hub_ids_resolve_offline(model, name):
    spec = resolve_model(model)
    assert spec.name == name and spec.config.num_layers > 0
    assert set(KNOWN_MODELS) == {"llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b",
                                 "qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-7b", "mistral-7b"}


def test_mistral_plan_notes_the_unapplied_sliding_window():
    assert "sliding window" in resolve_model("mistral-7b").notes[0]


def test_a_config_file_or_directory_is_read(tmp_path):
    (tmp_path / "x").mkdir()
    src = resolve_model("llama-3.2-1b").config
    cfg = {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
           "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
           "vocab_size": 128256, "tie_word_embeddings": True, "max_position_embeddings": 131072,
           "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}  # any RoPE is fine to plan
    (tmp_path / "x" / "config.json").write_text(json.dumps(cfg))
    for p in (tmp_path / "x", tmp_path / "x" / "config.json"):
        got = resolve_model(p).config
        assert num_params(got) == num_params(src)


# ---- the numbers ------------------------------------------------------------------------------
def test_llama_3_1_8b_kv_bytes_per_token():
    plan = plan_memory(resolve_model("llama-3.1-8b"), "24GiB", context=8192)
    # fp16: 32 layers x 2 (K, V) x 8 KV heads x 128 dims x 2 bytes
    assert plan.kv_bytes_per_token["fp16"] == 32 * 2 * 8 * 128 * 2 == 131_072
    assert plan.kv_bytes_per_token["int4"] == 32 * get_format("int4").bytes_per_token(8, 128)
    assert plan.kv_bytes_per_token["int4"] == 32 * 2 * 8 * (64 + 2 + 2) == 34_816
    assert plan.kv_bytes_per_token["int8"] == 32 * 2 * 8 * (128 + 2) == 66_560


def test_weight_bytes_by_hand():
    cfg = resolve_model("llama-3.1-8b").config
    assert weight_memory(cfg, "fp16").total_bytes == 2 * 8_030_261_248
    # one 4096 x 4096 q_proj
    assert int8_bytes(4096, 4096) == 4096 * 4096 + 4 * 4096  # codes + fp32 row scales
    n = 4096 * 4096
    assert nf4_bytes(n) == n // 2 + n // 64 + 4 * (n // 64 // 256) + 4 + 64 + 1024
    assert nf4_bytes(n, double_quant=False) == n // 2 + 4 * (n // 64) + 64
    # kept in 16-bit by bitsandbytes: embedding + untied lm_head + 65 norms
    kept = 2 * 128_256 * 4096 + 4096 + 32 * 2 * 4096
    for mode in ("int8", "nf4"):
        w = weight_memory(cfg, mode)
        assert w.kept_params == kept and w.kept_bytes == 2 * kept
        assert w.quantized_params + w.kept_params == 8_030_261_248
    layer = [(4096, 4096), (1024, 4096), (1024, 4096), (4096, 4096),
             (14336, 4096), (14336, 4096), (4096, 14336)]
    assert weight_memory(cfg, "int8").quantized_bytes == 32 * sum(int8_bytes(o, i)
                                                                   for o, i in layer)
    assert weight_memory(cfg, "nf4").quantized_bytes == 32 * sum(nf4_bytes(o * i)
                                                                  for o, i in layer)
    assert 0.51 < weight_memory(cfg, "nf4").quantized_bytes / (32 * sum(o * i for o, i in layer)
                                                               ) < 0.52


def test_max_context_is_the_budget_in_whole_blocks():
    assert kv_capacity(10**9, 131_072, 16) == (476, 7_616)  # 1e9 / 2,097,152 = 476.8 blocks
    assert kv_capacity(-5, 131_072, 16) == (0, 0)
    spec = resolve_model("llama-3.1-8b")
    plan = plan_memory(spec, "24GiB", context=8192, batch=3)
    for r in plan.rows:
        h = plan.headroom[r.weights]
        assert r.kv_budget_bytes == 24 * GiB - r.weight_bytes - h.total
        blocks = r.kv_budget_bytes // (r.kv_bytes_per_token * 16)
        assert (r.kv_blocks, r.kv_tokens) == (blocks, blocks * 16)
        assert r.max_context == min(blocks // 3 * 16, 131_072)
        assert r.max_batch == blocks // (8192 // 16)
        assert r.fits_context == (r.max_batch >= 3)
        # the runtime allocates exactly the planned blocks for that budget
        runtime = CacheConfig.for_budget(r.kv_budget_bytes, 32, 8, 128, 16, r.kv_format)
        assert runtime.num_blocks == blocks
    h = plan.headroom["nf4"]
    assert h.cuda_context == CUDA_CONTEXT_BYTES and h.dequant == 14336 * 4096 * 2
    assert h.logits == 3 * 128_256 * 8 and plan.headroom["fp16"].dequant == 0


def test_llama_3_2_3b_on_8gib_at_128k():
    plan = plan_memory(resolve_model("llama-3.2-3b"), "8GiB", context=131072)
    assert plan.row("nf4", "int4").fits_context
    assert plan.recommendation.row == plan.row("nf4", "int4")
    assert not any(r.fits_context for r in plan.rows if r.weights != "nf4")
    assert not plan.row("nf4", "int8").fits_context  # int8 KV at 128K needs 7.1 GiB
    assert plan.row("fp16", "fp16").status == "needs eviction"


def test_recommendation_prefers_precision_then_falls_back_to_eviction():
    roomy = plan_memory(resolve_model("qwen2.5-0.5b"), "16GiB", context=32768)
    assert (roomy.recommendation.row.weights, roomy.recommendation.row.kv_format) == (
        "fp16", "fp16")
    tight = plan_memory(resolve_model("llama-3.1-8b"), "8GiB", context=131072, batch=4)
    rec = tight.recommendation
    assert not rec.row.fits_context and "eviction" in rec.reason
    assert rec.row.max_context == max(r.max_context for r in tight.rows)
    none = plan_memory(resolve_model("llama-3.1-8b"), "2GiB", context=1024)
    assert none.recommendation is None
    assert {r.status for r in none.rows} == {"weights do not fit"}


# ---- bad input -------------------------------------------------------------------------------
def test_bad_input_raises_clear_value_errors(tmp_path):
    spec = resolve_model("llama-3.2-1b")
    with pytest.raises(ValueError, match="not a memory size: '8 gigs'.*GiB"):
        plan_memory(spec, "8 gigs")
    with pytest.raises(ValueError, match="beyond llama-3.2-1b's maximum of 131,072"):
        plan_memory(spec, "8GiB", context=131073)
    with pytest.raises(ValueError, match="batch must be"):
        plan_memory(spec, "8GiB", batch=0)
    with pytest.raises(ValueError, match="is 8 bytes: give a unit"):
        plan_memory(spec, "8")
    with pytest.raises(ValueError, match="'100MiB' is under 256 MiB: no GPU is that small"):
        plan_memory(spec, "100MiB")  # a unit was given: say what is wrong with it
    with pytest.raises(ValueError, match="num_attention_heads must be a positive integer"):
        config_from_hf_dict({"hidden_size": 64, "vocab_size": 10, "intermediate_size": 8,
                             "num_hidden_layers": 1, "num_attention_heads": 0})
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 64, "vocab_size": 10}))
    with pytest.raises(ValueError, match="lacks required fields: intermediate_size, "
                                         "num_hidden_layers, num_attention_heads"):
        resolve_model(tmp_path / "config.json")
    with pytest.raises(ValueError, match="not a config.json, a model directory"):
        resolve_model("no-such-model")


# ---- the CLI ---------------------------------------------------------------------------------
def run_plan(*args):
    return CliRunner().invoke(main, ["plan", *args])


def test_cli_table_and_json():
    r = run_plan("--model", "llama-3.2-3b", "--gpu-memory", "8GiB", "--context", "131072")
    assert r.exit_code == 0, r.output
    # the budget controller: int4 holds 128K with 1.2 GiB to spare; it buys int8 tiers
    assert "Recommended: nf4 weights + tiers fp16:128,int8:" in r.output
    assert "--weights nf4 --kv-tiers fp16:128,int8:" in r.output
    assert "predicted KL" in r.output and "prior: the bundled demo model" in r.output
    r = run_plan("--model", "llama-3.1-8b", "--gpu-memory", "24GiB", "--context", "8192",
                 "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert data["kv_bytes_per_token"]["fp16"] == 131_072
    assert data["model"]["max_position"] == 131_072
    assert len(data["configurations"]) == 3 * 6
    rec = data["recommendation"]  # the budget controller's choice, with its candidates
    assert rec["weights"] == "fp16" and rec["needs"] is None
    assert rec["choice"]["kv_format"] == "fp16" and rec["choice"]["predicted_kl"] == 0
    assert all(c["predicted_kl"] >= 0 for c in rec["candidates"])


@pytest.mark.parametrize("args, message", [
    (["--model", "llama-3.1-8b", "--gpu-memory", "8 gigs"], "not a memory size: '8 gigs'"),
    (["--model", "llama-3.1-8b", "--gpu-memory", "8GiB", "--context", "200000"],
     "context 200,000 is beyond llama-3.1-8b's maximum"),
    (["--model", "nowhere", "--gpu-memory", "8GiB"], "is not a config.json"),
    (["--model", "Qwen/Qwen2.5-7B-Instruct", "--gpu-memory", "8GiB", "--context", "65536"],
     "maximum of 32,768"),
])
def test_cli_bad_input_is_a_one_line_usage_error(args, message):
    r = run_plan(*args)
    assert r.exit_code == 2
    errors = [line for line in r.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and message in errors[0], r.output


# ---- LLM(kv_memory=None | "auto") ------------------------------------------------------------
def test_llm_auto_kv_memory_reports_its_plan(llama_dir, caplog):
    with caplog.at_level(logging.INFO, logger="edgekv"):
        llm = LLM(llama_dir, kv_format="int8", kv_memory="auto", device="cpu", max_num_seqs=4)
    plan = llm.kv_plan
    assert plan is not None and llm.cache_config.bytes_total == plan.kv_bytes
    assert plan.tokens == 4 * 512  # capped: 4 sequences x max_position
    assert any("KV pool" in m for m in caplog.messages)
    assert LLM(llama_dir, kv_memory="1MiB", device="cpu").kv_plan is None


def test_auto_plan_on_a_gpu_subtracts_the_headroom(monkeypatch):
    cfg = resolve_model("llama-3.2-3b").config
    monkeypatch.setattr("edgekv.cache.memory.available_bytes", lambda device: 6 * GiB)
    plan = auto_kv_plan(torch.device("cuda"), cfg, "int4", 16, max_num_seqs=8, weights="nf4")
    h = plan.headroom
    assert h.cuda_context == 0  # free memory was read after the context existed
    per_block = 30_464 * 16
    assert plan.kv_bytes == (6 * GiB - h.total) // per_block * per_block
    monkeypatch.setattr("edgekv.cache.memory.available_bytes", lambda device: 10**6)
    with pytest.raises(ValueError, match="not enough free memory"):
        auto_kv_plan(torch.device("cuda"), cfg, "int4")
