"""Packaging and the command line: one namespace, a working console script."""

import importlib.util
import shutil
import subprocess

from click.testing import CliRunner

import edgekv
from edgekv.cli.main import main


def test_subpackages_live_in_the_edgekv_namespace_only():
    import edgekv.kernels
    import edgekv.models
    import edgekv.quant

    for name in ("kernels", "models", "quant"):
        # no top-level module of these names: bitsandbytes/transformers import `kernels`
        # (the folders live under edgekv/, so not even the repository root provides one)
        assert importlib.util.find_spec(name) is None, f"top-level {name!r} is importable"
    assert edgekv.quant.__file__.replace("\\", "/").endswith("edgekv/quant/__init__.py")


def test_formats_command_prints_exact_costs():
    r = CliRunner().invoke(main, ["formats", "--layers", "32", "--kv-heads", "8",
                                  "--head-dim", "128"])
    assert r.exit_code == 0, r.output
    rows = {line.split()[0]: line.split()[1:] for line in r.output.splitlines()[1:]}
    assert rows["fp16"] == ["131,072", "1.000x"]  # Llama-3.1-8B: 2 * 32 * 8 * 128 * 2
    assert rows["int4"][0] == f"{32 * edgekv.quant.get_format('int4').bytes_per_token(8, 128):,}"


def test_formats_command_rejects_bad_shapes_with_exit_code_2():
    r = CliRunner().invoke(main, ["formats", "--head-dim", "0"])
    assert r.exit_code == 2 and "must be positive" in r.output


def test_console_script_is_installed():
    exe = shutil.which("edgekv")
    assert exe, "the edgekv console script is not on PATH"
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, check=True)
    assert edgekv.__version__ in out.stdout


def test_every_subpackage_is_listed_for_the_wheel():
    """pyproject lists packages explicitly (the folder mapping needs it): a new
    subpackage missing from the list would be left out of a wheel, silently."""
    from pathlib import Path

    import tomllib

    root = Path(edgekv.__file__).parent
    cfg = tomllib.loads((root.parent / "pyproject.toml").read_text())
    listed = set(cfg["tool"]["setuptools"]["packages"])
    found = {"edgekv." + ".".join(p.parent.relative_to(root).parts)
             for p in root.glob("*/**/__init__.py")}
    assert found <= listed, f"not in pyproject's packages: {sorted(found - listed)}"
