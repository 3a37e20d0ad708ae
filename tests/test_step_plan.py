"""What every layer shares is made once per step: RoPE from the positions the runner passes,
projections fused into one matmul, the CPU plan in the attention metadata."""

import numpy as np
import pytest
import torch
from torch import nn

from edgekv import LLM, SamplingParams
from edgekv.kernels import cpu_jit
from edgekv.models.config import ModelConfig
from edgekv.models.layers import RotaryEmbedding, SwiGLU, fused_linear


def _oracle_tokens(llm, prompts, params) -> list[list[int]]:
    """What the reference (oracle) kernels generate for ``prompts``."""
    from edgekv.kernels import set_backend

    set_backend("reference")
    try:
        return [o.token_ids for o in llm.generate(prompts, params)]
    finally:
        set_backend(None)


def _cfg(**kw) -> ModelConfig:
    hf = dict(architectures=["LlamaForCausalLM"], hidden_size=64, num_hidden_layers=1,
              num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
              vocab_size=128, max_position_embeddings=256, rope_theta=10000.0)
    return ModelConfig.from_hf(hf | kw)


def test_rope_follows_the_positions_not_the_token_indices():
    """Positions shifted by 5 (a context shift) rotate as the textbook rotate-half RoPE at
    those positions."""
    rope = RotaryEmbedding(_cfg())
    x = torch.randn(6, 3, 16)
    pos = torch.arange(6) + 5
    cos, sin = rope.cos_sin(pos, torch.float32)
    (got,) = rope(pos, x)
    freqs = pos.float()[:, None] * rope.inv_freq[None, :]
    emb = torch.cat([freqs, freqs], -1)[:, None, :]
    x1, x2 = x.chunk(2, -1)
    want = x * emb.cos() + torch.cat([-x2, x1], -1) * emb.sin()
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    (unshifted,) = rope(torch.arange(6), x)
    assert not torch.allclose(got, unshifted)


def test_fused_projections_stay_the_modules_parameters():
    """One matmul for gate/up; the Linears' weights become views of the fused tensor, so a
    later in-place edit (a checkpoint copied in) is what the fused matmul uses, and a
    replaced parameter is fused again."""
    torch.manual_seed(0)
    mlp = SwiGLU(_cfg())
    x = torch.randn(5, 64)
    want = mlp.down_proj(nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
    torch.testing.assert_close(mlp(x), want)
    w, _ = fused_linear(mlp, ("gate_proj", "up_proj"))
    assert mlp.gate_proj.weight.data_ptr() == w.data_ptr()
    assert mlp.up_proj.weight.data_ptr() == w[96:].data_ptr()
    with torch.no_grad():
        mlp.up_proj.weight.mul_(2.0)  # seen through the view
    torch.testing.assert_close(mlp(x), mlp.down_proj(
        nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x)))
    mlp.gate_proj.weight = nn.Parameter(torch.zeros(96, 64))  # replaced: fused again
    torch.testing.assert_close(mlp(x), mlp.down_proj(
        nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x)))


@pytest.mark.parametrize("compiled", [True, False])
def test_cpu_steps_plan_once_and_match_the_oracle(llama_dir, monkeypatch, compiled):
    """Through the engine, the CPU path (planned once per step) generates what the oracle
    path does, and a decode step plans once for every layer: its rows and buckets for the
    torch path, nothing more for the compiled kernels (they walk the block tables)."""
    import edgekv.engine.model_runner as runner
    import edgekv.kernels.cpu_plan as cpu_plan
    from edgekv.kernels import cpu_compiled

    if not compiled:
        monkeypatch.setenv(cpu_compiled.ENV_VAR, "0")
    steps, buckets = [], []
    real_step, real_decode = runner.plan_step, cpu_plan.plan_decode
    monkeypatch.setattr(runner, "plan_step", lambda *a, **k: steps.append(1) or real_step(*a, **k))
    monkeypatch.setattr(cpu_plan, "plan_decode",
                        lambda *a, **k: buckets.append(1) or real_decode(*a, **k))
    prompts = [[5, 9, 11, 40, 41], list(range(3, 60))]
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    llm = LLM(llama_dir, kv_format="int8", kv_memory="4MiB", dtype=torch.float32)
    got = [o.token_ids for o in llm.generate(prompts, params)]
    assert len(steps) == 6  # one plan per step (a prefill, 5 decodes), not one per layer
    assert len(buckets) == (0 if compiled and cpu_jit.available() else 5)
    assert got == _oracle_tokens(llm, prompts, params)


def test_shared_prefixes_group_sequences_by_their_leading_blocks():
    """Sequences are grouped by their first block; a group shares the leading blocks all
    its tables have, full in every member and before the block this step writes; a lone
    sequence or a prefix under two blocks makes no group."""
    from edgekv.kernels.cpu_plan import shared_prefixes

    B = 4
    tables = np.array([[7, 8, 9, 1], [7, 8, 9, 2], [7, 8, 3, 0], [5, 6, 4, 0],
                       [7, 8, 9, 10]], np.int32)
    # full blocks (len - 1) // B: 3, 3, 2, 2, 2 (sequence 4 writes its block 9 this step)
    sp = shared_prefixes(tables, np.array([14, 13, 12, 12, 9]), B)
    assert sp.count.tolist() == [4] and sp.blocks.tolist() == [2]
    assert sp.members[0].tolist() == [0, 1, 2, 4]
    assert sp.sel.tolist() == [0, 0, 0, -1, 0] and sp.slot.tolist() == [0, 1, 2, 0, 3]
    two = shared_prefixes(tables[:2], np.array([16, 16]), B)  # differ from the 4th block
    assert two.blocks.tolist() == [3]
    none = shared_prefixes(np.array([[7, 1], [7, 2]], np.int32), np.array([8, 8]), B)
    assert len(none.count) == 0 and none.sel.tolist() == [-1, -1]
    # one request sharing 2 blocks does not cut three others' 5 down to 2: it goes alone
    tables = np.array([[1, 2, 3, 4, 5, 9], [1, 2, 3, 4, 5, 8], [1, 2, 3, 4, 5, 7],
                       [1, 2, 6, 0, 0, 0]], np.int32)
    most = shared_prefixes(tables, np.full(4, 6 * B), B)
    assert most.members.tolist() == [[0, 1, 2]] and most.blocks.tolist() == [5]
    assert most.sel.tolist() == [0, 0, 0, -1]


def test_a_shared_system_prompt_is_read_once_per_step(llama_dir, monkeypatch):
    """Requests whose prompts start with a system prompt found in the prefix cache share its
    blocks; the compiled decode reads them once per step for the group and generates what
    the oracle path does."""
    import edgekv.kernels.cpu_plan as cpu_plan

    if not cpu_jit.available():
        pytest.skip("numba is not installed")
    groups = []
    real = cpu_plan.shared_prefixes
    monkeypatch.setattr(cpu_plan, "shared_prefixes",
                        lambda *a: groups.append(real(*a)) or groups[-1])
    system = list(range(3, 60))  # 57 tokens: 3 full blocks of 16
    prompts = [system + [100 + i, 7, 8 + i] for i in range(3)]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    llm = LLM(llama_dir, kv_format="int8", kv_memory="4MiB", dtype=torch.float32)
    llm.generate([system + [99]], SamplingParams(max_tokens=1))  # the prompt is cached
    groups.clear()
    got = [o.token_ids for o in llm.generate(prompts, params)]
    assert any(g.count.tolist() == [3] and g.blocks.tolist() == [3] for g in groups), \
        [(g.count.tolist(), g.blocks.tolist()) for g in groups]
    llm.check_integrity()
    assert got == _oracle_tokens(llm, prompts, params)
