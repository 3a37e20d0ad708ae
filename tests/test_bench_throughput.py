"""scripts/bench_throughput.py: every configuration runs, and EdgeKV makes every token."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_throughput.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_throughput", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_tiny_run_reports_every_configuration(bench, tmp_path, capsys):
    out = tmp_path / "throughput.json"
    bench.main(["--batches", "3", "--new-tokens", "5", "--prompt-lens", "4,12",
                "--repeats", "1", "--kv-memory", "8MiB", "--threads", "1",
                "--json", str(out)])
    printed = capsys.readouterr().out
    assert "tok/s" in printed and "peak MiB" in printed
    result = json.loads(out.read_text())
    assert result["new_tokens"] == 5 and result["prompt_lens"] == [4, 12]
    rows = result["rows"]
    assert not [r for r in rows if "error" in r], rows
    systems = {(r["system"], r["format"]) for r in rows}
    assert {("edgekv", f) for f in ("fp16", "int8", "int4")} <= systems
    assert ("hf-dynamic", "float32") in systems
    # transformers' quantized cache is measured or its absence is explained, never silent
    assert any(s == "hf-quantized" for s, _ in systems) or result["skipped"]
    for r in rows:
        assert r["batch"] == 3
        assert r["generated"] == r["expected"] == 3 * 5, r
        assert r["tokens_per_s"] > 0 and r["seconds"] > 0
        assert r["peak_bytes"] >= 0 and "vs_hf" in r and 0 <= r["same_tokens"] <= 1
        assert "token_ids" not in r  # kept out of the JSON
        if r["system"] == "edgekv":
            assert r["kv_bytes"] > 0 and r["peak_bytes"] >= r["kv_bytes"]
    hf = next(r for r in rows if r["system"] == "hf-dynamic")
    assert hf["vs_hf"] == 1.0 and hf["same_tokens"] == 1.0
    fp16 = next(r for r in rows if r["format"] == "fp16")
    int4 = next(r for r in rows if r["format"] == "int4")
    assert int4["kv_bytes"] < fp16["kv_bytes"]


def test_prompts_are_fixed_and_left_padded(bench):
    a = bench.make_prompts(16, 32, 128, vocab=4096, seed=0)
    assert a == bench.make_prompts(16, 32, 128, vocab=4096, seed=0)
    assert all(32 <= len(p) <= 128 for p in a) and len({len(p) for p in a}) > 1
    assert all(bench.FIRST_PROMPT_ID <= t < 4096 for p in a for t in p)
    ids, mask = bench.left_pad([[5, 6, 7], [8]], pad=0, device="cpu")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_ratios_and_agreement_are_against_hf_at_the_same_batch(bench):
    rows = [
        {"system": "hf-dynamic", "batch": 2, "tokens_per_s": 10.0, "generated": 4,
         "token_ids": [[1, 2], [3, 4]]},
        {"system": "edgekv", "batch": 2, "tokens_per_s": 25.0, "generated": 4,
         "token_ids": [[1, 9], [3, 4]]},
        {"system": "edgekv", "batch": 1, "tokens_per_s": 5.0, "generated": 2,
         "token_ids": [[1, 2]]},
        {"system": "edgekv", "batch": 2, "error": "boom"},
    ]
    bench.compare(rows)
    assert rows[1]["vs_hf"] == 2.5 and rows[1]["same_tokens"] == 0.75
    assert "vs_hf" not in rows[2]  # no transformers row at batch 1
    assert "vs_hf" not in rows[3]
