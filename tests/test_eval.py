"""`edgekv eval`: a tiny end-to-end run, its outputs, the harness check against
transformers, determinism, bad input, and the metric functions."""

import json
import math

import pytest
import torch
from click.testing import CliRunner

from edgekv.cli.main import main
from edgekv.eval import COLUMNS, EvalConfig, report, run
from edgekv.eval.data import make_prompts, make_windows, read_documents
from edgekv.eval.metrics import kl_top1, nll_sum, relative_error, tokens_until_divergence
from edgekv.llm import EVICTION_POLICIES

SENTENCES = ("Once upon a time there was a small cache that held many keys and values. "
             "The quick brown fox jumps over the lazy dog. Hello! How are you today? "
             "I am fine, thank you for asking. ")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("evaltext") / "text.txt"
    p.write_text(SENTENCES * 12, encoding="utf-8")
    return p


def tiny(llama_dir, text_file, **kw):
    """A small run: 2 windows of 48 tokens, 1 scored token by token, 2 short prompts."""
    args = dict(model=str(llama_dir), text=str(text_file), formats=("fp16", "int4", "fp32"),
                window=48, max_windows=2, decode_windows=1, prompts=2, prompt_len=12,
                gen_len=4, layer_tokens=24, peers=("hf",))
    args.update(kw)
    return run(EvalConfig(**args))


@pytest.fixture(scope="module")
def rows(llama_dir, text_file):
    return tiny(llama_dir, text_file)


# ---- end to end ------------------------------------------------------------------------
def test_rows_have_the_columns_and_the_baseline_first(rows):
    assert [r["format"] for r in rows] == ["fp16", "int4", "fp32", "hf"]
    for r in rows:
        assert set(COLUMNS) <= set(r)
        assert r["window"] == 48 and r["ppl_windows"] == 2 and r["decode_windows"] == 1
        assert r["eviction"] is None and r["kv_budget"] is None
        assert math.isfinite(r["ppl"]) and math.isfinite(r["kl"]) and 0 <= r["top1"] <= 1
        assert "passkey: skipped" in r["run_notes"]  # 512-token context
    fp16, int4, fp32, hf = rows
    assert fp16["delta_ppl_pct"] == 0 and fp16["kl"] == 0 and fp16["top1"] == 1
    assert fp16["greedy_match"] == 4 and fp16["greedy_full"] == 1
    assert int4["kl"] > 0 and int4["bytes_per_token"] < fp16["bytes_per_token"]
    assert len(int4["attn_rel_err_layers"]) == 2  # one per layer
    assert fp32["attn_rel_err"] == 0  # same inputs, same cache format as the reference
    assert 0 < fp16["attn_rel_err"] < int4["attn_rel_err"]
    assert hf["backend"] == "transformers" and hf["attn_rel_err"] is None


def transformers_ppl(llama_dir, text_file, window, stride, num_windows):
    """Perplexity computed by transformers itself over windows of ``window`` tokens every
    ``stride``: the first scores all its targets, each later one its last ``stride``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(llama_dir))
    model = AutoModelForCausalLM.from_pretrained(str(llama_dir), dtype=torch.float32).eval()
    ids = tok.encode(text_file.read_text(), add_special_tokens=False)
    nll, n = 0.0, 0
    with torch.no_grad():
        for k in range(num_windows):
            x = torch.tensor([ids[k * stride : k * stride + window + 1]])
            logits = model(x[:, :-1]).logits[0]  # (window, V)
            keep = 0 if k == 0 else window - stride
            nll += torch.nn.functional.cross_entropy(logits[keep:], x[0, 1 + keep :],
                                                     reduction="sum").item()
            n += window - keep
    return math.exp(nll / n)


def test_fp16_row_equals_transformers_perplexity(rows, llama_dir, text_file):
    """The harness measures what it says: transformers' own perplexity on the same
    windows (computed here independently) equals the fp16 row's within 0.1%."""
    want = transformers_ppl(llama_dir, text_file, window=48, stride=48, num_windows=2)
    assert rows[0]["ppl"] == pytest.approx(want, rel=1e-3)
    assert rows[3]["ppl"] == pytest.approx(rows[0]["ppl"], rel=1e-3)  # the hf peer row


def test_overlapping_windows_equal_transformers_sliding_perplexity(llama_dir, text_file):
    """stride < window: each window after the first scores only its last ``stride``
    targets, with the rest as context; transformers computes the same by hand here."""
    (row,) = tiny(llama_dir, text_file, formats=("fp16",), peers="none", window=48,
                  stride=16, max_windows=4, decode_windows=0, prompts=0, layer_tokens=0)
    assert row["stride"] == 16 and row["ppl_tokens"] == 48 + 3 * 16
    want = transformers_ppl(llama_dir, text_file, window=48, stride=16, num_windows=4)
    assert row["ppl"] == pytest.approx(want, rel=1e-3)


def test_quantized_greedy_agreement_is_counted_against_fp16(rows):
    fp16, int4, fp32, _ = rows
    assert fp32["greedy_match"] == 4 and fp32["greedy_full"] == 1  # an exact cache agrees
    assert 0 <= int4["greedy_match"] <= 4 and 0 <= int4["greedy_full"] <= 1


def test_two_runs_give_identical_numbers(rows, llama_dir, text_file):
    again = tiny(llama_dir, text_file, formats=("fp16", "int4"), peers="none",
                 layer_tokens=0, prompts=0)
    for a, b in zip(rows[:2], again, strict=True):
        for k in ("ppl", "ppl_decode", "kl", "top1"):
            assert a[k] == b[k], k


def test_cli_writes_json_csv_markdown(llama_dir, text_file, tmp_path):
    out = tmp_path / "r"
    r = CliRunner().invoke(main, [
        "eval", "--model", str(llama_dir), "--text", str(text_file), "--formats", "fp16,int8",
        "--window", "32", "--max-windows", "1", "--decode-windows", "1", "--prompts", "1",
        "--prompt-len", "8", "--gen-len", "2", "--layer-tokens", "16", "--peers", "none",
        "--json", f"{out}.json", "--csv", f"{out}.csv", "--markdown", f"{out}.md"])
    assert r.exit_code == 0, r.output
    assert "int8" in r.output and "Δppl %" in r.output
    data = json.loads((tmp_path / "r.json").read_text())
    assert [d["format"] for d in data] == ["fp16", "int8"]
    for k in ("format", "eviction", "kv_budget", "ppl", "delta_ppl_pct", "kl", "top1",
              "window", "stride", "model"):
        assert k in data[0]
    assert (tmp_path / "r.csv").read_text().splitlines()[0].startswith("format,backend,")
    assert (tmp_path / "r.md").read_text().startswith("| format |")


def test_plot(rows, tmp_path):
    pytest.importorskip("matplotlib")
    from edgekv.eval.plot import plot

    plot(rows, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_passkey_runs_when_asked_for(llama_dir, text_file):
    (r,) = tiny(llama_dir, text_file, formats=("fp16",), peers="none", decode_windows=0,
                prompts=0, layer_tokens=0, passkey_lengths=(300, 400), passkey_depths=(0, 1),
                passkey_trials=1, max_windows=1)
    assert sorted(r["passkey"]["acc"]) == ["300", "400"]
    assert set(r["passkey"]["acc"]["300"]) == {"0", "1"}
    assert 0 <= r["passkey_acc"] <= 1


@pytest.mark.skipif(not EVICTION_POLICIES, reason="no eviction policies in this build")
def test_eviction_rows_are_token_by_token(llama_dir, text_file):
    policy = EVICTION_POLICIES[0]
    rows = tiny(llama_dir, text_file, formats=("fp16",), eviction=(policy,), budgets=(32,),
                peers="none", window=64, prompts=0, layer_tokens=0)
    base, ev = rows
    assert ev["eviction"] == policy and ev["kv_budget"] == 32 and ev["ppl_mode"] == "decode"
    assert "token by token" in ev["notes"] and math.isfinite(ev["ppl"])
    assert ev["kl"] > 0  # 64 tokens through a 32-token budget lose something


def test_exact_window_rows_measure_each_quantized_format_with_its_window(llama_dir, text_file):
    rows = tiny(llama_dir, text_file, formats=("fp16", "int4"), exact_window=(0, 48),
                peers="none", prompts=0, layer_tokens=0)
    assert [(r["format"], r["exact_window"]) for r in rows] == [
        ("fp16", 0), ("int4", 0), ("int4", 48)]  # fp16 has nothing to keep unquantized
    _, plain, windowed = rows
    assert windowed["kl"] < 1e-5 < plain["kl"]  # a 48-token window holds all 48 tokens
    assert "int4 +w48" in report.table_line(windowed)


def test_tier_rows_are_token_by_token_and_count_each_tier_at_its_bytes(llama_dir,
                                                                       text_file):
    rows = tiny(llama_dir, text_file, formats=("fp16", "int4", "int8"), exact_window=(0, 8),
                tiers=("fp16:8,int8:16,int4",), peers="none", prompts=0, layer_tokens=0,
                window=64)
    by = {(r["format"], r["exact_window"]): r for r in rows}
    tier = by[("tiers fp16:8,int8:16,int4", 0)]
    assert tier["ppl_mode"] == "decode" and "token by token" in tier["notes"]
    # bytes over the 64-token window: 8 exact fp16 tokens, the int8 tier's one block
    # (blocks of 16: the next-newest block's newest token is 16 tokens old), int4 the rest
    fp16 = by[("fp16", 0)]["bytes_per_token"]
    int8, int4 = by[("int8", 0)]["bytes_per_token"], by[("int4", 0)]["bytes_per_token"]
    assert tier["bytes_per_token"] == (8 * fp16 + 16 * int8 + 48 * int4) // 64
    assert by[("int4", 8)]["bytes_per_token"] == (64 * int4 + 8 * fp16) // 64
    # the newest tokens exact, the next in int8, the rest int4: between int8 and int4
    # with the same exact window (scoring demotes as generation does)
    assert by[("int8", 8)]["kl"] < tier["kl"] < by[("int4", 8)]["kl"]


def test_eviction_in_prefill_chunks_streams_the_window_as_a_long_prompt(llama_dir,
                                                                       text_file):
    kw = dict(formats=("fp16",), eviction=("snapkv",), budgets=(32,), peers="none",
              window=64, prompts=0, layer_tokens=0)
    _, by_token = tiny(llama_dir, text_file, **kw)
    _, chunked = tiny(llama_dir, text_file, eviction_chunk=16, **kw)
    assert "in prefill chunks of 16" in chunked["notes"] and chunked["eviction_chunk"] == 16
    assert math.isfinite(chunked["ppl"]) and chunked["kl"] > 0
    assert chunked["ppl"] != by_token["ppl"]  # chunks see one another's tokens differently


# ---- bad input: one line, exit code 2 ----------------------------------------------------
@pytest.mark.parametrize("args, message", [
    (["--formats", "fp16,int3"], "unknown KV format 'int3'"),
    (["--eviction", "nosuch"], "unknown eviction policy 'nosuch'"),
    (["--text", "/nonexistent/t.txt"], "text file not found"),
    (["--window", "4096"], "longer than the model's context"),
    (["--budgets", "0.5,abc"], "--budgets must be"),
    (["--tiers", "int8:64"], "one stored tier"),
])
def test_bad_input_is_one_line_exit_2(args, message, llama_dir, text_file):
    base = ["eval", "--model", str(llama_dir), "--text", str(text_file), "--peers", "none"]
    r = CliRunner().invoke(main, base + args)
    assert r.exit_code == 2, r.output
    assert message in r.output and len(r.output.strip().splitlines()) == 1, r.output


def test_text_shorter_than_one_window(llama_dir, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Hello there.")
    r = CliRunner().invoke(main, ["eval", "--model", str(llama_dir), "--text", str(short),
                                  "--window", "64"])
    assert r.exit_code == 2 and "shorter than one window" in r.output
    assert len(r.output.strip().splitlines()) == 1


# ---- the pieces ----------------------------------------------------------------------------
def test_windows_score_each_target_once():
    ids = list(range(100))
    ws = make_windows(ids, window=40, stride=20)
    assert [w.inputs[0] for w in ws] == [0, 20, 40]
    assert [w.scored for w in ws] == [0, 20, 20]
    scored = [t for w in ws for t in w.targets[w.scored :]]
    assert scored == list(range(1, 81))  # each target once, in order
    with pytest.raises(ValueError, match="shorter than one window"):
        make_windows(ids[:40], 40, 40)
    assert [p[0] for p in make_prompts(ids, 3, 10)] == [0, 45, 90]


def test_dataset_files(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "a b"}\n{"text": "c"}\n')
    (tmp_path / "d.csv").write_text("id,text\n1,x y\n2,z\n")
    (tmp_path / "d.json").write_text('["p", {"text": "q"}]')
    assert read_documents(tmp_path / "d.jsonl") == ["a b", "c"]
    assert read_documents(tmp_path / "d.csv") == ["x y", "z"]
    assert read_documents(tmp_path / "d.json") == ["p", "q"]


def test_metrics():
    torch.manual_seed(0)
    a = torch.randn(5, 11)
    assert kl_top1(a, a) == (0.0, 5)
    kl, top1 = kl_top1(a, a + 0.3 * torch.randn(5, 11))
    assert kl > 0 and 0 <= top1 <= 5
    t = torch.tensor([1, 2, 3, 4, 5])
    assert nll_sum(a, t) == pytest.approx(
        torch.nn.functional.cross_entropy(a, t, reduction="sum").item(), rel=1e-6)
    assert tokens_until_divergence([1, 2, 3], [1, 2, 4]) == 2
    assert relative_error(a, a) == 0 and relative_error(a, 2 * a) == pytest.approx(1.0)
