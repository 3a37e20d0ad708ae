"""The compiled CPU decode path end to end: a whole decoder layer per call for one
sequence (models/cpu_fused.py), the compiled attention layer for several, against the
modules over torch (EDGEKV_CPU_JIT=0) on the same checkpoint, every family."""

import os

import numpy as np
import pytest
import torch
from kernel_cases import random_paged_kv

from edgekv import LLM, SamplingParams
from edgekv.engine.scheduler import ScheduledBatch
from edgekv.kernels import cpu_compiled, cpu_jit
from edgekv.kernels.cpu_plan import JitStep
from edgekv.models import cpu_fused, layers
from edgekv.quant import QuantizedKV, get_format

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


@pytest.mark.parametrize("fmt", ["fp16", "int8", "int4", "int4_nl"])
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("transposed", [True, False])
def test_compiled_decode_matches_the_modules(family, fmt, batch, transposed, tiny_model_dirs,
                                             monkeypatch):
    """Both weight layouts (layers.transpose_for_cpu): a small model's (in, out) memory
    through torch's GEMM, a large one's (out, in) rows through small_linear."""
    if not transposed:
        monkeypatch.setattr(layers, "CPU_TRANSPOSE_MAX_BYTES", 0)
    path = tiny_model_dirs[family]
    prompts = [_prompt(9 + 13 * i, i) for i in range(batch)]
    ran = []
    real = cpu_fused.run
    monkeypatch.setattr(cpu_fused, "run", lambda *a: ran.append(real(*a)) or ran[-1])
    got = _decode_logits(path, fmt, prompts)
    # every layer without its modules; qwen3's q/k norms: the step is not planned for it
    assert (not ran) if family == "qwen3" else (ran and all(n == 2 for n in ran)), ran
    monkeypatch.setenv(cpu_compiled.ENV_VAR, "0")
    want = _decode_logits(path, fmt, prompts)
    # the same codes but for rounding ties (a fast Walsh-Hadamard transform, not a matmul)
    assert (got - want).abs().max() <= 2e-3 * want.abs().max()
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.95


@pytest.mark.parametrize("limit, transposed", [(64 << 20, True), (0, False)])
def test_a_small_models_weights_lie_transposed_on_cpu(llama_dir, monkeypatch, limit,
                                                      transposed):
    """Under the size limit every decoder Linear's (out, in) weight is a view of (in, out)
    memory, the fused q/k/v and gate/up included; over it they stay (out, in) and a
    decode batch runs small_linear. Greedy output is the modules' (the compiled kernels
    off) either way. Logits against transformers': test_model_parity.py."""
    monkeypatch.setattr(layers, "CPU_TRANSPOSE_MAX_BYTES", limit)
    calls = []
    real = cpu_jit.small_linear
    monkeypatch.setattr(cpu_jit, "small_linear", lambda *a: calls.append(1) or real(*a))
    prompts = [_prompt(12, 0), _prompt(9, 1)]
    greedy = SamplingParams(max_tokens=3, temperature=0.0)
    llm = LLM(llama_dir, kv_format="int8", kv_memory="4MiB", dtype=torch.float32)
    out = llm.generate(prompts, greedy)
    layer = llm.engine.runner.model.model.layers[0]
    for m in (layer.self_attn.q_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
              layer.mlp.up_proj, layer.mlp.down_proj):
        assert (m.weight.stride(0) == 1) == transposed  # (in, out) memory
        assert m.weight.is_contiguous() != transposed
    assert bool(calls) != transposed
    monkeypatch.setenv(cpu_compiled.ENV_VAR, "0")
    ref = LLM(llama_dir, kv_format="int8", kv_memory="4MiB", dtype=torch.float32)
    want = ref.generate(prompts, greedy)
    assert [o.token_ids for o in out] == [o.token_ids for o in want]


@pytest.mark.parametrize("rows", [2, 3, 4, 5, 8, 16, 17])
@pytest.mark.parametrize("n_out", [16, 17, 19])
@pytest.mark.parametrize("bias", [False, True])
def test_small_linear_matches_torch(rows, n_out, bias):
    """4 x 4 tiles, the rows and outputs left over, the bias: as nn.functional.linear."""
    g = torch.Generator().manual_seed(rows * 100 + n_out)
    x, w = torch.randn(rows, 40, generator=g), torch.randn(n_out, 40, generator=g)
    b = torch.randn(n_out, generator=g) if bias else None
    got = cpu_jit.small_linear(x.numpy(), w.numpy(), np.zeros(0, np.float32) if b is None
                               else b.numpy(), 1)
    torch.testing.assert_close(torch.from_numpy(got), torch.nn.functional.linear(x, w, b),
                               atol=1e-4, rtol=1e-5)


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


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("where", ["layers.1.mlp", "layers.0.self_attn.o_proj",
                                   "lm_head"])
def test_forward_hooks_see_every_module(llama_dir, batch, where):
    """A hook on a layer's module (as eval's layer probes use) turns the fused call off;
    a hook on a projection or the output head sees every call too."""
    llm = LLM(llama_dir, kv_format="int8", kv_memory="4MiB", dtype=torch.float32)
    seen = []
    model = llm.engine.runner.model
    module = model.get_submodule(where if where == "lm_head" else "model." + where)
    handle = module.register_forward_hook(lambda *a: seen.append(1))
    try:
        llm.generate([_prompt(10 + i, i) for i in range(batch)],
                     SamplingParams(max_tokens=4, temperature=0.0))
    finally:
        handle.remove()
    assert len(seen) == 4  # the prefill and three decode steps


def test_fp16_cache_clamps_like_the_format():
    """A value past fp16's range is stored as its largest finite value, never inf (the
    torch path reading the same block would turn inf into NaN)."""
    fmt = get_format("fp16")
    k, v, bt = random_paged_kv(fmt, [5], 1, 16, 8, device=torch.device("cpu"))
    blk = int(bt[0, 0])
    step = JitStep(bt.to(torch.int32).numpy(), np.array([6], np.int32), np.array([blk]),
                   np.array([5]), 6)
    qkv = torch.zeros(1, 3 * 8)
    qkv[0, 16:] = torch.tensor([7e4, -7e4, 1.0, 0.5, 0, 0, 0, 0])  # v of the new token
    out = cpu_compiled.compiled_layer(qkv, torch.ones(1, 1, 8), torch.zeros(1, 1, 8), k, v,
                                      step, cpu_compiled.layer_kind(fmt, 8), 0.35)
    assert out is not None and torch.isfinite(out).all()
    want = fmt.quantize(qkv[0, 16:]).data
    assert torch.equal(v.data[blk, 0, 5], want) and want[0] == 65504


def test_codebook_writes_match_the_format():
    """The compiled layer writes int4_nl's codes and group scales as
    CodebookFormat.quantize does: the same scale for (nearly) every group, and no group
    stored worse (the rotation runs as a Walsh-Hadamard transform, not a matmul, so a
    value on a midpoint, or two candidate scales equally good, may round the other way)."""
    fmt, D, S, H = get_format("int4_nl"), 128, 8, 2
    k, v, bt = random_paged_kv(fmt, [5] * S, H, 16, D, device=torch.device("cpu"))
    blocks = bt[:, 0].numpy().astype(np.int64)
    step = JitStep(bt.to(torch.int32).numpy(), np.full(S, 6, np.int32), blocks,
                   np.full(S, 5), 6)
    g = torch.Generator().manual_seed(5)
    qkv = torch.randn(S, (4 * H + 2 * H) * D, generator=g) * 3
    out = cpu_compiled.compiled_layer(qkv, torch.ones(S, 1, D), torch.zeros(S, 1, D), k, v,
                                      step, cpu_compiled.layer_kind(fmt, D), D**-0.5)
    assert out is not None and torch.isfinite(out).all()
    new = qkv.view(S, 6 * H, D)[:, 4 * H:].reshape(S, 2, H, D)  # (S, k/v, H, D)
    for i, store in enumerate((k, v)):
        got = QuantizedKV(store.data[blocks, :, 5], store.scale[blocks, :, 5])
        want = fmt.quantize(new[:, i])
        assert (got.scale == want.scale).float().mean() >= 0.95
        x = fmt.to_storage_basis(new[:, i])
        err_got = (fmt.decode(got) - x).square().view(S, H, -1, fmt.group_size).sum(-1)
        err_want = (fmt.decode(want) - x).square().view(S, H, -1, fmt.group_size).sum(-1)
        assert torch.all(err_got <= err_want * 1.001 + 1e-6)


@pytest.mark.parametrize("D", [64, 128])
def test_prefill_codebook_write_is_compiled_and_the_formats(D):
    """A prefill's K/V (many rows at once) go through the compiled codebook writer, not
    the torch search: the format's codes and e4m3 scales, byte for byte, at every
    magnitude e4m3 holds (tiny groups, large ones, zeros)."""
    fmt = get_format("int4_nl")
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 300, D, generator=g) * torch.logspace(-3, 2, 300).view(1, 300, 1)
    x[0, 7] = 0
    got = cpu_compiled.quantize_codebook(x, fmt)
    assert got is not None, "the compiled writer did not take int4_nl"
    want = fmt.quantize_storage(x)
    assert got.data.shape == want.data.shape and got.scale.shape == want.scale.shape
    assert torch.equal(got.data, want.data)
    assert torch.equal(got.scale.view(torch.uint8), want.scale.view(torch.uint8))
    assert cpu_compiled.quantize_codebook(x, get_format("int4")) is None


_CONCURRENT = """
import os, sys, threading, torch
from edgekv import LLM, SamplingParams
torch.set_num_threads(1)
llms = [LLM(sys.argv[1], kv_format="int8", kv_memory="4MiB", dtype=torch.float32)
        for _ in range(2)]
params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
def run(llm):
    for _ in range(3):
        llm.generate([[5, 6, 7, 8], [9, 10, 11]], params)
threads = [threading.Thread(target=run, args=(m,)) for m in llms]
for t in threads: t.start()
for t in threads: t.join()
llms[0].generate([[5, 6, 7]], params)  # a compiled call, then a fork that decodes
pid = os.fork()
if pid == 0:
    out = llms[0].generate([[5, 6, 7]], SamplingParams(max_tokens=5, temperature=0.0))
    os._exit(0 if len(out[0].outputs[0].token_ids) == 5 else 3)
_, status = os.waitpid(pid, 0)
print("done", os.waitstatus_to_exitcode(status))
"""


@pytest.mark.parametrize("layer", ["default", "workqueue"])
def test_two_threads_and_a_fork_survive(llama_dir, tmp_path, layer):
    """Two engines decoding on two threads at once, then a forked child decoding: under
    numba's workqueue layer concurrent launches abort the process unless serialised, and
    GNU OpenMP kills a forked child that uses it (the child runs the torch path)."""
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1")
    if layer == "workqueue":
        env["NUMBA_THREADING_LAYER"] = "workqueue"
    script = tmp_path / "two_threads_and_a_fork.py"
    script.write_text(_CONCURRENT)
    out = subprocess.run([sys.executable, str(script), str(llama_dir)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("done 0"), out.stdout + out.stderr[-2000:]


def test_numba_missing_is_one_warning_and_the_torch_path(llama_dir, monkeypatch, caplog):
    """Where numba cannot be imported, one warning names why and decoding runs torch."""
    import logging
    import sys

    monkeypatch.setitem(sys.modules, "numba", None)  # import numba -> ImportError
    cpu_jit._jit.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="edgekv.kernels.cpu_jit"):
            llm = LLM(llama_dir, kv_format="int4", kv_memory="4MiB", dtype=torch.float32)
            out = llm.generate([_prompt(12, 1)] * 2, SamplingParams(max_tokens=5,
                                                                    temperature=0.0))
        assert [len(o.outputs[0].token_ids) for o in out] == [5, 5]
        warned = [r for r in caplog.records if "numba is unavailable" in r.getMessage()]
        assert len(warned) == 1
    finally:
        monkeypatch.undo()
        cpu_jit._jit.cache_clear()
    assert cpu_jit.available()


def test_a_first_compile_says_so_once(tmp_path, monkeypatch, caplog):
    """With no compiled kernels cached for these sources, one line says the first reply
    will take longer; with them cached, nothing."""
    import logging

    numba = cpu_jit._jit()[0]
    monkeypatch.setattr(numba.config, "CACHE_DIR", numba.config.CACHE_DIR)  # restored after
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="edgekv.kernels.cpu_jit"):
        cpu_jit._cache_dir(numba)
        assert numba.config.CACHE_DIR.startswith(str(tmp_path))
        os.makedirs(numba.config.CACHE_DIR)
        cpu_jit._cache_dir(numba)
    said = [r.getMessage() for r in caplog.records if "compiling" in r.getMessage()]
    assert len(said) == 1 and numba.config.CACHE_DIR in said[0]
