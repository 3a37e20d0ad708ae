"""The kernels compile for real GPUs (sm_80, sm_90), checked without one.

The CPU interpreter runs the kernels' Python semantics but not Triton's compiler, which
rejects things the interpreter accepts (dot shapes, dtype combinations, non-constexpr
globals). scripts/compile_kernels.py compiles every launch ahead of time; here for one
format with every code path of the asymmetric, rotating default (int4), to stay fast.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "compile_kernels.py"


def test_kernels_compile_for_cuda_targets():
    pytest.importorskip("triton.backends.nvidia.compiler", reason="no Triton NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, str(SCRIPT), "--arch", "80,90", "--formats", "int4"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "FAIL" not in res.stdout
    assert res.stdout.count("ok ") >= 8  # decode x2, merge, prefill, write; two targets
