"""Shared test set-up. Triton kernels run under the interpreter when there is no GPU."""

import os

import torch

if not torch.cuda.is_available():
    # Must be set before triton decorates any kernel.
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The compiled CPU kernels' cache (kernels/cpu_jit.py) stays in the real user cache when a
# test runs the CLI with another HOME: compiled once per run, and nothing in that HOME.
os.environ.setdefault("XDG_CACHE_HOME", os.path.expanduser("~/.cache"))


import pytest  # noqa: E402

from tiny_models import FAMILIES, build_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory):
    """One tiny random checkpoint per family (built once per test session)."""
    root = tmp_path_factory.mktemp("models")
    return {fam: build_tiny_model(root / fam, fam) for fam in FAMILIES}


@pytest.fixture(scope="session")
def llama_dir(tiny_model_dirs):
    return tiny_model_dirs["llama"]
