"""What every layer shares is made once per step: RoPE from the positions the runner passes,
projections fused into one matmul, the CPU plan in the attention metadata."""

import pytest
import torch
from torch import nn

from edgekv import LLM, SamplingParams
from edgekv.kernels import cpu_jit
from edgekv.models.config import ModelConfig
from edgekv.models.layers import RotaryEmbedding, SwiGLU, fused_linear


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
    import edgekv.kernels.cpu_plan as cpu_plan
    import edgekv.model_runner as runner
    from edgekv.kernels import cpu_compiled, set_backend

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
    set_backend("reference")
    try:
        want = [o.token_ids for o in llm.generate(prompts, params)]
    finally:
        set_backend(None)
    assert got == want
