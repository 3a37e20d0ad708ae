"""The README is a front door: short, every link resolves, its API example runs as written;
docs/results.md names a command, a machine and a date for every measurement."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[([^\]]+)\]\(([^)\s]+)\)")


def _prose(text: str) -> str:
    """The text outside fenced code blocks."""
    return re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)


def _anchors(text: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to dashes."""
    out = set()
    for line in _prose(text).splitlines():
        m = re.match(r"^#{1,6} (.*)", line)
        if m:
            out.add(re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-"))
    return out


def test_the_readme_is_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 300


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_link_resolves(page):
    text = page.read_text()
    for label, target in LINK.findall(_prose(text)):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        assert dest.exists(), f"{page.name}: [{label}]({target}): no {dest}"
        if anchor and dest.suffix == ".md":
            assert anchor in _anchors(dest.read_text()), \
                f"{page.name}: [{label}]({target}): no heading #{anchor} in {dest.name}"


def test_every_result_names_its_command_machine_and_date():
    rows = [line for line in (ROOT / "docs" / "results.md").read_text().splitlines()
            if line.startswith("| ") and not line.startswith(("| measurement", "|---"))]
    assert len(rows) >= 15
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert re.search(r"`(python scripts/\S+|edgekv \w+|OMP_NUM_THREADS=\d edgekv \w+)",
                         cells[1]), row
        assert re.search(r"^(CPU|GPU|arithmetic)", cells[2]), row  # the machine
        assert re.search(r"\b20\d\d-\d\d-\d\d\b", cells[2]), row  # the date


def test_the_readme_api_example_runs(tmp_path, monkeypatch):
    """The fenced block after <!-- api-example --> runs as written (the demo model, CPU)."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- api-example -->\s*```python\n(.*?)```", text, re.S).group(1)
    monkeypatch.setenv("EDGEKV_AUTO_DIR", str(tmp_path / "probes"))
    out = io.StringIO()
    scope: dict = {}
    with contextlib.redirect_stdout(out):
        exec(compile(block, "README.md:api-example", "exec"), scope)
    printed = out.getvalue()
    assert scope["out"].finish_reason in ("stop", "length")
    assert "1088" in printed.replace(",", "")  # int4 K+V bytes per token, as the comment says
    assert scope["tiered"].cache_config.tiers is not None
    assert scope["chosen"].kv_decision.choice.fits
    scope["llm"].check_integrity()
