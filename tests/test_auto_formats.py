"""kv_format="auto": the budget syntax, the knapsack against brute force, the probe's
prediction against the KL then measured, outlier layers put in the higher precision, the
probe kept per model on disk."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from safetensors.torch import load_file, save_file

from edgekv import LLM
from edgekv.auto import ProbeResult, choose, parse_auto
from edgekv.auto import resolve as auto_resolve
from edgekv.quant import get_format

from tiny_models import build_tiny_model

PLANTED = (1, 3)  # layers whose keys get outlier channels
VOCAB = 320


@pytest.fixture(autouse=True)
def probe_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEKV_AUTO_DIR", str(tmp_path / "auto"))
    return tmp_path / "auto"


@pytest.mark.parametrize("spec, bits", [("auto", None), ("auto:4.5", 4.5), ("auto:16", 16.0)])
def test_auto_spec(spec, bits):
    assert parse_auto(spec).bits == bits
    assert parse_auto("int4") is None and parse_auto(["int8", "int4"]) is None


@pytest.mark.parametrize("bad", ["auto:", "auto:x", "auto:0.5", "auto:40", "autox", "auto:nan"])
def test_a_malformed_budget_is_one_line(bad, llama_dir):
    with pytest.raises(ValueError, match="auto:BITS"):
        parse_auto(bad)
    with pytest.raises(ValueError, match="auto:BITS"):
        LLM(llama_dir, kv_format=bad, kv_memory="1MiB")


def _probe(rng: random.Random, layers: int, formats: int) -> ProbeResult:
    err = tuple(tuple(rng.uniform(0.01, 0.5) for _ in range(formats)) for _ in range(layers))
    kl = tuple(tuple(e * e * rng.uniform(0.5, 2.0) for e in row) for row in err)
    return ProbeResult(tuple(f"f{j}" for j in range(formats)), kl, err, 100)


@pytest.mark.parametrize("seed", range(6))
def test_choose_is_the_least_predicted_kl_within_the_budget(seed):
    rng = random.Random(seed)
    p = _probe(rng, 5, 3)
    cost = [rng.randint(10, 60) for _ in range(3)]
    for budget in (5 * min(cost), rng.randint(5 * min(cost), 5 * max(cost)), 5 * max(cost)):
        a = choose(p, cost, budget)
        best = min((sum(p.predicted[i][j] for i, j in enumerate(c)), sum(cost[j] for j in c))
                   for c in itertools.product(range(3), repeat=5)
                   if sum(cost[j] for j in c) <= budget)
        assert a.predicted_kl == pytest.approx(best[0])
        assert a.bytes_per_token <= budget
        assert a.bytes_per_token == sum(cost[p.formats.index(f)] for f in a.formats)
    with pytest.raises(ValueError, match="below the cheapest"):
        choose(p, cost, 5 * min(cost) - 1)


def test_the_prediction_is_kl_where_it_is_quadratic_in_the_error():
    err = ((0.0, 0.1, 0.15), (0.0, 0.3, 0.2))
    kl = ((0.0, 0.02, 0.045), (0.0, 0.009, 0.004))  # 2 err^2, 0.1 err^2
    p = ProbeResult(("a", "b", "c"), kl, err, 10)
    for want, got in zip(kl, p.predicted, strict=True):
        assert got == pytest.approx(want)
    # noise between formats of similar error is smoothed; a distant one keeps its own KL
    noisy = ProbeResult(("a", "b", "c", "d"), ((0.0, 0.021, 0.043, 1e-3),),
                        ((0.0, 0.1, 0.15, 0.01),), 10)
    (row,) = noisy.predicted
    assert row[1] / 0.1**2 == pytest.approx(row[2] / 0.15**2)
    assert row[3] == pytest.approx(1e-3)


def outlier_model(root, planted: tuple[int, ...]):
    """A random 4-layer Llama (head_dim 64) with two key channels per KV head scaled 60x in
    the ``planted`` layers, as the massive pre-RoPE key channels of real models."""
    path = build_tiny_model(root, "llama", seed=3, num_hidden_layers=4, head_dim=64,
                            hidden_size=256)
    w = load_file(str(path / "model.safetensors"))
    for layer in planted:
        k = w[f"model.layers.{layer}.self_attn.k_proj.weight"]  # (Hkv * D, hidden)
        for head in range(2):
            k[head * 64 + torch.tensor([5, 37])] *= 60.0
    w["lm_head.weight"] *= 0.3  # softer logits: KL in the range real models show
    save_file(w, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def mean_kl(ref: torch.Tensor, other: torch.Tensor) -> float:
    r, o = torch.log_softmax(ref.double(), -1), torch.log_softmax(other.double(), -1)
    return (r.exp() * (r - o)).sum(-1).mean().item()


def test_outlier_layers_get_the_higher_precision_and_the_prediction_holds(tmp_path):
    g = torch.Generator().manual_seed(0)
    calibration = torch.randint(3, VOCAB, (400,), generator=g).tolist()
    held_out = torch.randint(3, VOCAB, (400,), generator=g).tolist()
    per = {f: get_format(f).bytes_per_token(2, 64) for f in ("int8", "int4")}
    budget_bits = 8 * (3 * per["int8"] + per["int4"]) / (2 * 4 * 2 * 64)  # three int8 layers
    kw = dict(kv_memory="4MiB", dtype="float32", kv_calibration=calibration)
    chosen = {}
    for name, planted in (("clean", ()), ("outliers", PLANTED)):
        path = outlier_model(tmp_path / name, planted)
        llm = LLM(path, kv_format=f"auto:{budget_bits}", **kw)
        chosen[name] = llm.kv_auto.formats
        if planted:
            ref = LLM(path, kv_format="fp16", kv_memory="4MiB", dtype="float32")
            measured = mean_kl(ref.score(held_out), llm.score(held_out))
            assert measured == pytest.approx(llm.kv_auto.predicted_kl, rel=0.3), (
                llm.kv_auto, llm.kv_probe)
            err = llm.kv_probe.err
            j = llm.kv_probe.formats.index("int4")
            assert min(err[i][j] for i in planted) > 2 * max(
                err[i][j] for i in range(4) if i not in planted)
    assert all(chosen["outliers"][i] == "int8" for i in PLANTED), chosen
    assert chosen["clean"][3] != "int8", chosen  # layer 3 earns it by its outliers alone


def test_the_probe_is_stored_per_model_and_reused(llama_dir, probe_dir, monkeypatch):
    ids = list(range(3, 200))
    first = LLM(llama_dir, kv_format="auto:6", kv_memory="1MiB", kv_calibration=ids)
    assert len(list(probe_dir.glob("*.json"))) == 1

    def no_probe(*a, **k):
        raise AssertionError("probed again")

    monkeypatch.setattr(auto_resolve, "measure", no_probe)
    again = LLM(llama_dir, kv_format="auto:5", kv_memory="1MiB", kv_calibration=ids)
    assert again.kv_probe == first.kv_probe
    (f,) = probe_dir.glob("*.json")
    f.write_text("{not json")  # a damaged file costs a probe, not the load
    monkeypatch.undo()
    monkeypatch.setenv("EDGEKV_AUTO_DIR", str(probe_dir))
    third = LLM(llama_dir, kv_format="auto:6", kv_memory="1MiB", kv_calibration=ids)
    assert third.kv_auto == first.kv_auto
    third.check_integrity()


def test_target_context_sets_the_budget(llama_dir):
    ids = list(range(3, 200))
    llm = LLM(llama_dir, kv_format="auto", kv_memory="96KiB", target_context=512,
              kv_calibration=ids)
    assert llm.kv_auto.budget == 96 * 1024 // 512
    assert llm.cache_config.num_blocks * 16 >= 512
    with pytest.raises(ValueError, match="cannot hold target_context=512 tokens in any"):
        LLM(llama_dir, kv_format="auto", kv_memory="32KiB", target_context=512,
            kv_calibration=ids)
    with pytest.raises(ValueError, match="fewer than target_context"):
        LLM(llama_dir, kv_format="fp16", kv_memory="192KiB", target_context=1024)
    with pytest.raises(ValueError, match="target_context needs kv_memory"):
        LLM(llama_dir, kv_format="int8", target_context=1024)


def test_on_the_demo_model_auto_beats_uniform_formats_as_predicted():
    """The bundled model, probed on the start of its held-out text, measured on tokens
    1,024-2,047: at int4_g32's bytes auto is better than int4_g32, and its predicted
    KL is within 30 % of the KL measured."""
    from edgekv.llm import DEMO_MODEL_DIR

    kw = dict(kv_memory="8MiB", dtype="float32")
    ref = LLM(None, kv_format="fp16", **kw)
    ids = ref.encode((DEMO_MODEL_DIR / "heldout.txt").read_text())[1024:2048]
    want = ref.score(ids)
    g32 = LLM(None, kv_format="int4_g32", **kw)
    for spec in ("auto:5", "auto:6"):
        auto = LLM(None, kv_format=spec, **kw)
        assert auto.cache_config.bytes_per_token <= g32.cache_config.bytes_per_token or \
            spec != "auto:5"
        measured = mean_kl(want, auto.score(ids))
        assert measured == pytest.approx(auto.kv_auto.predicted_kl, rel=0.3), auto.kv_auto
        if spec == "auto:5":
            assert measured < mean_kl(want, g32.score(ids))


def test_a_probe_resumed_at_each_layer_equals_full_prefills(llama_dir):
    """The probe skips the layers below the one it changes (forward_from); what it
    measures is what full prefills measure."""
    from edgekv.auto.probe import measure

    class Whole(torch.nn.Module):  # the same model without forward_from: full prefills
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *args):
            return self.inner(*args)

        def compute_logits(self, hidden):
            return self.inner.compute_logits(hidden)

    llm = LLM(llama_dir, kv_format="fp16", kv_memory="1MiB", dtype="float32")
    mc, ids = llm.model_config, list(range(3, 120))
    args = (mc.num_layers, mc.num_kv_heads, mc.head_dim, ids, ("fp16", "int8", "int4"))
    fast, full = measure(llm.model, *args), measure(Whole(llm.model), *args)
    for a, b in ((fast.kl, full.kl), (fast.err, full.err)):
        assert [x for row in a for x in row] == pytest.approx([x for row in b for x in row],
                                                              rel=1e-4, abs=1e-9)
    assert fast.kl[1][2] > 0 and fast.err[0][1] > 0
