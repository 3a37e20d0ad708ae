"""Startup: ``edgekv --help`` and the parsing of every subcommand import no torch."""

import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "safetensors", "numpy", "numba")


def loaded_after(code: str) -> list[str]:
    """The heavy modules a fresh interpreter holds after running ``code``."""
    probe = f"{code}\nimport sys\nprint([m for m in {HEAVY!r} if m in sys.modules])"
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    return eval(r.stdout.strip().splitlines()[-1])


def test_importing_the_cli_imports_no_torch():
    assert loaded_after("import edgekv, edgekv.cli.main") == []


@pytest.mark.parametrize("args", [
    ["--help"], ["--version"],
    ["chat", "--help"], ["serve", "--help"], ["generate", "--help"], ["formats", "--help"],
    ["plan", "--help"], ["eval", "--help"],
    # parsing that fails on a bad choice is decided without loading a model either
    ["chat", "--kv", "int3"], ["generate", "--eviction", "lru", "hi"],
])
def test_parsing_every_subcommand_imports_no_torch(args):
    code = ("from edgekv.cli.main import main\n"
            f"try:\n    main({args!r}, prog_name='edgekv')\nexcept SystemExit:\n    pass")
    assert loaded_after(code) == []


def test_a_bad_choice_is_one_line_and_exit_2():
    r = subprocess.run([sys.executable, "-m", "edgekv.cli", "chat", "--kv", "int3"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "'int3' is not one of" in r.stderr and "'int8'" in r.stderr


def test_public_names_still_import_from_the_package():
    from edgekv import LLM, CacheConfig, SamplingParams, parse_memory
    from edgekv.llm import LLM as LLM2

    assert LLM is LLM2 and SamplingParams(max_tokens=3).max_tokens == 3
    assert parse_memory("1KiB") == 1024 and CacheConfig.__name__ == "CacheConfig"
    import edgekv

    assert set(edgekv.__all__) <= set(dir(edgekv))
    with pytest.raises(AttributeError):
        edgekv.no_such_name  # noqa: B018


def test_the_light_name_lists_equal_the_registries():
    from edgekv import names
    from edgekv.eviction import EVICTION_POLICIES
    from edgekv.plan import KNOWN_MODELS
    from edgekv.quant import FORMATS, VARIANTS

    assert names.KV_FORMATS == FORMATS
    assert names.KV_VARIANTS == VARIANTS
    assert names.EVICTION_POLICIES == EVICTION_POLICIES
    assert names.KNOWN_MODELS == tuple(KNOWN_MODELS)


def test_loading_the_model_code_imports_no_numba():
    """numba (and LLVM, ~120 MiB) loads on the first CPU decode step, not with the models."""
    assert "numba" not in loaded_after("import edgekv.llm, edgekv.models, edgekv.kernels")
