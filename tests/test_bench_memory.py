"""scripts/bench_memory.py: paged allocation keeps >= 96% of reserved KV bytes live."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_memory.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_memory", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_paged_beats_contiguous_on_the_trace(bench, tmp_path, capsys):
    out = tmp_path / "mem.json"
    bench.main(["--shape", "tiny", "--requests", "60", "--kv-memory", "32MiB",
                "--formats", "fp16,int4", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "paged" in printed and "contiguous" in printed
    rows = json.loads(out.read_text())
    by = {(r["format"], r["allocator"]): r for r in rows["trace"]}
    for f in ("fp16", "int4"):
        paged, contiguous = by[(f, "paged")], by[(f, "contiguous")]
        assert paged["utilization"] >= 0.96
        assert paged["utilization"] > 2 * contiguous["utilization"]
        assert paged["mean_concurrent"] > contiguous["mean_concurrent"]
    # int4 fits more requests than fp16 in the same budget
    assert by[("int4", "paged")]["mean_concurrent"] > by[("fp16", "paged")]["mean_concurrent"]
    ratios = {r["format"]: r["vs_fp16"] for r in rows["bytes"]}
    assert ratios["int8"] <= 0.52 and ratios["int4"] <= 0.28


def test_every_request_finishes_exactly_once(bench):
    trace = bench.make_trace(40, 1024, seed=3)
    # a tight budget forces preemptions; the run still completes every request
    r = bench.run_paged(trace, num_blocks=80, block_size=16)
    assert r["preemptions"] > 0
    assert r["completed"] == list(range(40))
    assert r["steps"] >= max(t.output for t in trace)
    c = bench.run_contiguous(trace, slots=3, max_len=1024)
    assert c["completed"] == list(range(40)) and c["peak_concurrent"] == 3
