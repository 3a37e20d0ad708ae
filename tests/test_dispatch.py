"""Routing of the runtime's entry points: Triton kernels, the torch path, the oracle."""

import logging

import pytest
import torch
from kernel_cases import DEVICE, empty_store, random_paged_kv

import edgekv.kernels as K
from edgekv.kernels import dispatch
from edgekv.kernels.cpu_decode import paged_decode_attention_cpu
from edgekv.quant import get_format


@pytest.fixture(autouse=True)
def _clean_backend(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    dispatch.set_backend(None)
    dispatch._warned.clear()
    yield
    dispatch.set_backend(None)


@pytest.fixture
def calls(monkeypatch):
    """Counts calls into the Triton launchers (wrapping the real ones)."""
    import edgekv.kernels.paged_decode as pd
    import edgekv.kernels.paged_prefill as pp
    import edgekv.kernels.quant_write as qw

    seen = []
    for mod, name in ((pd, "paged_decode_attention"), (pp, "paged_prefill_attention"),
                      (qw, "write_kv_triton")):
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _r=real, _n=name, **k: (seen.append(_n),
                                                                              _r(*a, **k))[1])
    return seen


def _decode_inputs(name="int8"):
    fmt = get_format(name)
    k, v, bt = random_paged_kv(fmt, [5, 20], 2, 16, 64)
    q = torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    return q, k, v, bt, torch.tensor([5, 20], dtype=torch.int32, device=DEVICE), fmt


def test_backend_switches(monkeypatch):
    assert dispatch.get_backend() == "auto"
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")
    assert dispatch.get_backend() == "torch"
    dispatch.set_backend("triton")  # set_backend wins over the environment
    assert dispatch.get_backend() == "triton"
    dispatch.set_backend(None)
    assert dispatch.get_backend() == "torch"
    with pytest.raises(ValueError, match="unknown attention backend"):
        dispatch.set_backend("cuda")
    monkeypatch.setenv(dispatch.ENV_VAR, "fast")
    with pytest.raises(ValueError, match=dispatch.ENV_VAR):
        dispatch.get_backend()


def test_auto_routes_by_device(calls):
    q, k, v, bt, sl, fmt = _decode_inputs()
    out = K.paged_decode_attention(q, k, v, bt, sl, fmt)
    if DEVICE.type == "cpu":  # the torch path, not the oracle (equal to it within 2e-5)
        assert calls == []
        assert torch.equal(out, paged_decode_attention_cpu(q, k, v, bt, sl, fmt))
        torch.testing.assert_close(out, K.paged_decode_attention_ref(q, k, v, bt, sl, fmt),
                                   atol=1e-5, rtol=1e-5)
    else:
        assert calls == ["paged_decode_attention"]


@pytest.mark.parametrize("how", ["set_backend", "env"])
def test_forced_triton_runs_the_kernels(calls, monkeypatch, how):
    if how == "env":
        monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    else:
        dispatch.set_backend("triton")
    q, k, v, bt, sl, fmt = _decode_inputs()
    ref = K.paged_decode_attention_ref(q, k, v, bt, sl, fmt)
    out, mass = K.paged_decode_attention(q, k, v, bt, sl, "int8", return_block_mass=True,
                                         num_splits=2)
    assert calls == ["paged_decode_attention"]
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(mass, K.decode_block_mass_ref(q, k, bt, sl, fmt), atol=1e-5,
                               rtol=1e-4)
    cu = torch.tensor([0, 1, 2], dtype=torch.int32, device=DEVICE)
    out = K.paged_prefill_attention(q, k, v, bt, sl, cu, fmt, precise=True)
    assert calls[-1] == "paged_prefill_attention"
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_forced_torch_on_any_device(calls):
    dispatch.set_backend("torch")
    q, k, v, bt, sl, fmt = _decode_inputs("int4")
    out, mass = K.paged_decode_attention(q, k, v, bt, sl, fmt, return_block_mass=True)
    assert calls == []
    torch.testing.assert_close(mass.sum(1), torch.full((2,), 8.0, device=DEVICE))
    assert torch.equal(out, paged_decode_attention_cpu(q, k, v, bt, sl, fmt,
                                                       return_block_mass=True)[0])


def test_forced_reference_runs_the_oracle(calls):
    dispatch.set_backend("reference")
    q, k, v, bt, sl, fmt = _decode_inputs("int4")
    out = K.paged_decode_attention(q, k, v, bt, sl, fmt)
    assert calls == []
    assert torch.equal(out, K.paged_decode_attention_ref(q, k, v, bt, sl, fmt))
    cu = torch.tensor([0, 1, 2], dtype=torch.int32, device=DEVICE)
    out = K.paged_prefill_attention(q, k, v, bt, sl, cu, fmt)
    assert torch.equal(out, K.paged_prefill_attention_ref(q, k, v, bt, sl, cu, fmt))


@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
def test_write_kv_every_backend(calls, backend):
    dispatch.set_backend(backend)
    fmt = get_format("fp8")
    g = torch.Generator().manual_seed(0)
    k, v = (torch.randn(9, 2, 64, generator=g).to(DEVICE) for _ in range(2))
    slots = torch.arange(9, device=DEVICE) * 5
    got = [empty_store(fmt, 4, 2, 16, 64) for _ in range(2)]
    want = [empty_store(fmt, 4, 2, 16, 64) for _ in range(2)]
    K.write_kv(got[0], got[1], k, v, slots, fmt)
    K.write_kv_ref(want[0], want[1], k, v, slots, fmt)
    assert calls == (["write_kv_triton"] if backend == "triton" else [])
    for a, b in zip(got, want, strict=True):
        assert (a.data.int() - b.data.int()).abs().max() <= 1
        torch.testing.assert_close(a.scale, b.scale, rtol=1e-3, atol=0)


def test_cuda_fallback_warns_once(caplog):
    """A CUDA call the kernels cannot take (odd head_dim) falls back with one warning."""
    fmt, cuda = get_format("fp16"), torch.device("cuda")
    with caplog.at_level(logging.WARNING, logger="edgekv.kernels.dispatch"):
        assert dispatch._use_triton(cuda, fmt, 63) is False
        assert dispatch._use_triton(cuda, fmt, 63) is False
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "even head_dim" in warnings[0].getMessage()
    dispatch.set_backend("triton")
    with pytest.raises(ValueError, match="even head_dim"):
        dispatch._use_triton(cuda, fmt, 63)


def test_cpu_auto_never_warns(caplog):
    with caplog.at_level(logging.WARNING):
        assert dispatch._use_triton(torch.device("cpu"), get_format("int4"), 64) is False
    assert caplog.records == []


def test_importing_kernels_does_not_import_triton():
    import subprocess
    import sys

    code = "import sys, edgekv.kernels; print('triton' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert res.stdout.strip() == "False"


def test_forced_triton_on_cpu_without_interpreter_is_a_clear_error():
    if DEVICE.type != "cpu":
        pytest.skip("CPU-only behaviour")
    import os
    import subprocess
    import sys

    code = (
        "import torch\n"
        "from edgekv.kernels import dispatch\n"
        "dispatch.set_backend('triton')\n"
        "try:\n"
        "    from edgekv.quant import get_format\n"
        "    dispatch._use_triton(torch.device('cpu'), get_format('int8'), 64)\n"
        "except ValueError as e:\n"
        "    print(e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env=env)
    assert "TRITON_INTERPRET=1" in res.stdout
