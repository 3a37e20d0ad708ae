"""The folders show the architecture: a small top level, small modules."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "edgekv"


def test_the_top_level_is_a_few_modules_and_the_subpackages():
    modules = sorted(p.name for p in ROOT.glob("*.py") if p.name != "__init__.py")
    assert len(modules) <= 8, modules
    for pkg in ("engine", "cache", "session", "cli", "tiers", "kernels", "quant", "models"):
        assert (ROOT / pkg / "__init__.py").is_file(), pkg


def test_no_module_is_over_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in ROOT.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long
