"""The bundled demo model: loads offline by default, reproduces its card, and the trainer runs."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from edgekv import LLM, SamplingParams
from edgekv.llm import DEMO_MODEL_DIR

ROOT = Path(__file__).resolve().parents[1]


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_bundled_model_is_complete_and_small():
    names = {p.name for p in DEMO_MODEL_DIR.iterdir()}
    for need in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json", "README.md", "model_card.json", "heldout.txt"):
        assert need in names
    size = sum(p.stat().st_size for p in DEMO_MODEL_DIR.iterdir())
    assert size < 16 * 2**20
    cfg = json.loads((DEMO_MODEL_DIR / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["head_dim"] == 128
    assert cfg["num_attention_heads"] // cfg["num_key_value_heads"] == 4  # GQA
    assert cfg["max_position_embeddings"] >= 1024


def test_llm_with_no_model_loads_the_demo_and_writes_text():
    llm = LLM(kv_memory="16MiB", dtype="float32")
    assert llm.model_dir == DEMO_MODEL_DIR
    out = llm.generate("ROMEO:\n", SamplingParams(max_tokens=24, temperature=0.0))[0]
    assert len(out.text.split()) >= 3  # words, not byte soup


def test_model_card_perplexity_is_reproduced_through_the_paged_cache():
    card = json.loads((DEMO_MODEL_DIR / "model_card.json").read_text())["eval"]
    llm = LLM(kv_format="fp32", kv_memory="64MiB", dtype="float32")
    text = (DEMO_MODEL_DIR / card["text"]).read_text(encoding="utf-8")
    ids = llm.tokenizer.encode(text, add_special_tokens=False)
    eot = llm.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert eot in ids  # files are joined by the end-of-text token, as in training
    w = card["window"]
    nll, count = 0.0, 0
    for i in range(card["windows"]):
        x = torch.tensor(ids[i * w : (i + 1) * w + 1])
        logits = llm.score(x[:-1].tolist())
        nll += torch.nn.functional.cross_entropy(logits, x[1:], reduction="sum").item()
        count += w
    ppl = math.exp(nll / count)
    assert ppl == pytest.approx(card["ppl"], rel=0.005)


def test_training_script_runs_a_few_steps(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_text("ROMEO:\nBut soft, what light through yonder window breaks?\n\n"
                                * 200)
    (data / "b.txt").write_text("It is a truth universally acknowledged, that a single man "
                                "in possession of a good fortune must be in want of a wife.\n"
                                * 200)
    train = load_script("train_demo_model")
    card = train.main(["--data", str(data), "--out", str(tmp_path / "m"), "--tiny",
                       "--steps", "3", "--vocab", "300", "--context", "64", "--batch", "2",
                       "--warmup", "1", "--eval-windows", "2"])
    assert card["steps"] == 3 and math.isfinite(card["eval"]["ppl"])
    llm = LLM(tmp_path / "m", kv_memory="2MiB", dtype="float32")  # our loader reads it
    assert len(llm.generate("ROMEO:", SamplingParams(max_tokens=4, temperature=0.0,
                                                     ignore_eos=True))[0].token_ids) == 4
    assert "ROMEO" in (tmp_path / "m" / "tokenizer_config.json").read_text() or \
        (tmp_path / "m" / "chat_template.jinja").exists()
