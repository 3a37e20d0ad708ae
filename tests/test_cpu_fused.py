"""The compiled CPU decode path end to end: a whole decoder layer per call for one
sequence (models/cpu_fused.py), the compiled attention layer for several, against the
modules over torch (EDGEKV_CPU_JIT=0) on the same checkpoint, every family."""

import pytest
import torch

from edgekv import LLM, SamplingParams
from edgekv.kernels import cpu_compiled, cpu_jit
from edgekv.models import cpu_fused
from edgekv.scheduler import ScheduledBatch

from tiny_models import FAMILIES

pytestmark = pytest.mark.skipif(not cpu_jit.available(), reason="numba is not installed")


def _prompt(n, seed):
    return torch.randint(3, 320, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _decode_logits(path, fmt, prompts, steps=12):
    """Prefill each prompt, then ``steps`` decode steps of the whole batch, feeding fixed
    tokens: (steps, S, vocab) logits."""
    llm = LLM(path, kv_format=fmt, kv_memory="4MiB", dtype=torch.float32)
    eng = llm.engine
    seqs = [eng.new_sequence(p, SamplingParams(max_tokens=1)) for p in prompts]
    for s in seqs:
        _, copies = eng.manager.append_slots(s.seq_id, s.num_tokens)
        eng.cache.copy_blocks(copies)
        eng.runner.run(ScheduledBatch([s], [s.num_tokens]))
        s.num_computed = s.num_tokens
    out = []
    for i in range(steps):
        for s in seqs:
            s.token_ids.append(3 + (7 * i + s.seq_id) % 300)
            _, copies = eng.manager.append_slots(s.seq_id, 1)
            eng.cache.copy_blocks(copies)
        logits, _ = eng.runner.run(ScheduledBatch(seqs, [1] * len(seqs)))
        for s in seqs:
            s.num_computed += 1
        out.append(logits)
    return torch.stack(out)


@pytest.mark.parametrize("fmt", ["fp16", "int8", "int4"])
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("batch", [1, 3])
def test_compiled_decode_matches_the_modules(family, fmt, batch, tiny_model_dirs,
                                             monkeypatch):
    path = tiny_model_dirs[family]
    prompts = [_prompt(9 + 13 * i, i) for i in range(batch)]
    ran = []
    real = cpu_fused.run
    monkeypatch.setattr(cpu_fused, "run", lambda *a: ran.append(real(*a)) or ran[-1])
    got = _decode_logits(path, fmt, prompts)
    if batch == 1:  # every layer fused, except where a family cannot be (qwen3's q/k norm)
        assert ran and all(n == (0 if family == "qwen3" else 2) for n in ran), ran
    monkeypatch.setenv(cpu_compiled.ENV_VAR, "0")
    want = _decode_logits(path, fmt, prompts)
    # the same codes but for rounding ties (a fast Walsh-Hadamard transform, not a matmul)
    assert (got - want).abs().max() <= 2e-3 * want.abs().max()
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.95


def test_rms_norm_matches_torch():
    x = torch.randn(37, 96) * 3
    w = torch.randn(96)
    got = cpu_compiled.rms_norm(x, w, 1e-6)
    torch.testing.assert_close(got, torch.rms_norm(x, (96,), w, 1e-6), atol=1e-5, rtol=1e-5)
    assert cpu_compiled.rms_norm(x.half(), w, 1e-6) is None  # not fp32: torch's


def test_torch_keeps_its_thread_count():
    """numba's OpenMP pool resets the process's count when it starts: put back."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cpu_jit._numba_threads.n = 0
        cpu_jit._parallel(cpu_jit._jit()[1].attend, 2)
        assert torch.get_num_threads() == 1
    finally:
        cpu_jit._numba_threads.n = 0
        torch.set_num_threads(before)


def test_without_numba_the_torch_path_runs(llama_dir, monkeypatch, caplog):
    monkeypatch.setattr(cpu_jit, "available", lambda: False)
    llm = LLM(llama_dir, kv_format="int8", kv_memory="4MiB", dtype=torch.float32)
    monkeypatch.setattr(cpu_jit, "decoder_layer", lambda *a: pytest.fail("compiled ran"))
    monkeypatch.setattr(cpu_jit, "decode_layer", lambda *a: pytest.fail("compiled ran"))
    out = llm.generate([_prompt(12, 0)], SamplingParams(max_tokens=6, temperature=0.0))
    assert len(out[0].outputs[0].token_ids) == 6
