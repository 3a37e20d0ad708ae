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


def test_quick_suite_measures_every_case_prefill_decode_and_loading(bench, tmp_path, capsys):
    out = tmp_path / "quick.json"
    bench.main(["--quick", "--formats", "int8", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "decode" in printed and "peak/weights" in printed
    result = json.loads(out.read_text())
    assert result["suite"] == "quick" and len(result["cases"]) == 2
    demo, qwen = result["cases"]
    assert "demo" in demo["model"] and "Qwen2.5-0.5B" in qwen["model"]
    for case in result["cases"]:
        assert case["load_average"] and case["rounds"] == 1
        runs = [r for r in case["rows"] if not r["system"].startswith("load-")]
        assert {r["system"] for r in runs} == {"hf-dynamic", "edgekv"}
        for r in runs:
            assert "error" not in r, r
            assert r["generated"] == r["expected"] and r["threads"] == 1
            assert r["prefill_tokens_per_s"] > 0 and r["decode_tokens_per_s"] > 0
            assert r["prefill_seconds"] < r["seconds"] and r["rss_peak_bytes"] > 0
            assert "decode_vs_hf" in r
    loads = {r["system"]: r for r in qwen["rows"] if r["system"].startswith("load-")}
    assert set(loads) == {"load-edgekv", "load-hf"}
    for r in loads.values():
        assert "error" not in r, r
        assert r["weights_bytes"] > 0 and r["baseline_rss_bytes"] > r["peak_bytes"] >= 0
        assert r["peak_over_weights"] == r["peak_bytes"] / r["weights_bytes"]


def test_rounds_merge_to_medians_and_threads_to_speedups(bench):
    runs = [{"system": "edgekv", "format": "int8", "batch": 1, "threads": 2,
             "tokens_per_s": t, "decode_tokens_per_s": t / 2, "seconds": 10 / t,
             "token_ids": [[1]]} for t in (30.0, 10.0, 20.0)]
    row = bench.merge_rounds(runs)
    assert row["tokens_per_s"] == 20.0 and row["decode_tokens_per_s"] == 10.0
    assert row["rounds"] == 3 and row["tokens_per_s_runs"] == [30.0, 10.0, 20.0]
    assert "error" in bench.merge_rounds([*runs, {"system": "edgekv", "error": "boom"}])
    one = {"system": "edgekv", "format": "int8", "batch": 1, "threads": 1,
           "tokens_per_s": 8.0, "decode_tokens_per_s": 4.0}
    hf1 = {"system": "hf-dynamic", "format": "float32", "batch": 1, "threads": 1,
           "tokens_per_s": 10.0, "decode_tokens_per_s": None}
    hf2 = {**hf1, "threads": 2, "tokens_per_s": 15.0}
    (e, h) = bench.thread_speedups([one, row, hf1, hf2])
    assert (e["system"], e["threads"], e["speedup"], e["decode_speedup"]) == \
        ("edgekv", 2, 2.5, 2.5)
    assert (h["system"], h["speedup"], h["decode_speedup"]) == ("hf-dynamic", 1.5, None)


def test_threads_option_plans_every_configuration_at_each_count(bench):
    a = bench.parse_args(["--threads", "1,2", "--batches", "1,4", "--formats", "int4",
                          "--load"])
    configs = bench.plan(a, "float32", None)
    assert configs[:2] == ["load-edgekv:float32:0:1", "load-hf:float32:0:1"]
    assert "edgekv:int4:4:2" in configs and "hf-dynamic:float32:1:2" in configs
    assert len(configs) == 2 * (2 + 2 * 2)
