"""On a CPU, fp16 checkpoints compute in fp32 unless the user asks for a dtype."""

import io

import pytest
import torch

from edgekv import LLM, SamplingParams
from edgekv.cli.repl import ChatREPL
from edgekv.models import loader

from tiny_models import build_tiny_model


@pytest.fixture(scope="module")
def fp16_dir(tmp_path_factory):
    """A tiny Llama saved in fp16: its config.json says torch_dtype float16."""
    import transformers as tf

    path = build_tiny_model(tmp_path_factory.mktemp("fp16"), "llama")
    tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float16).save_pretrained(path)
    return path


def test_fp16_checkpoint_computes_in_fp32_on_cpu(fp16_dir):
    from safetensors.torch import load_file

    llm = LLM(fp16_dir, kv_format="fp16", kv_memory="4MiB", device="cpu")
    assert llm.model_config.torch_dtype == "float16"
    assert llm.compute_dtype == torch.float32
    assert {p.dtype for p in llm.model.parameters()} == {torch.float32}
    saved = load_file(str(fp16_dir / "model.safetensors"))
    name = "model.layers.0.mlp.down_proj.weight"
    got = dict(llm.model.named_parameters())[name]
    assert saved[name].dtype == torch.float16
    assert torch.equal(got, saved[name].float())  # fp16 -> fp32 is exact
    assert len(llm.generate([[5, 6, 7]], SamplingParams(max_tokens=4, temperature=0,
                                                        ignore_eos=True))[0].token_ids) == 4


@pytest.mark.parametrize("asked, want", [("float16", torch.float16),
                                         (torch.bfloat16, torch.bfloat16),
                                         ("fp32", torch.float32)])
def test_an_explicit_dtype_wins(fp16_dir, asked, want):
    llm = LLM(fp16_dir, kv_format="fp16", kv_memory="4MiB", device="cpu", dtype=asked)
    assert llm.compute_dtype == want
    assert next(llm.model.parameters()).dtype == want


@pytest.mark.parametrize("native, want", [(True, torch.bfloat16), (False, torch.float32)])
def test_bf16_checkpoints_stay_bf16_only_where_the_cpu_multiplies_bf16(monkeypatch, native,
                                                                       want):
    monkeypatch.setattr(loader, "_native_bf16", lambda: native)
    assert loader.cpu_compute_dtype(torch.bfloat16) == want
    assert loader.cpu_compute_dtype(torch.float16) == torch.float32
    assert loader.cpu_compute_dtype(torch.float32) == torch.float32


def test_off_the_cpu_the_checkpoint_dtype_is_kept(fp16_dir):
    _, cfg = loader.read_config(fp16_dir)
    assert loader.resolve_dtype(None, cfg, "cuda") == torch.float16
    assert loader.resolve_dtype(None, cfg, "cpu") == torch.float32
    with pytest.raises(ValueError, match="unsupported dtype 'float8'"):
        loader.resolve_dtype("float8", cfg, "cpu")


def test_the_demo_model_chats_in_fp32_on_cpu_and_says_so():
    llm = LLM(kv_memory="8MiB", device="cpu")
    assert llm.model_config.torch_dtype == "float16" and llm.compute_dtype == torch.float32
    out = io.StringIO()
    ChatREPL(llm, SamplingParams(max_tokens=4, temperature=0), None, out=out).run(
        ["Hello\n"], interactive=False)
    status = [ln for ln in out.getvalue().splitlines() if ln.startswith("[")]
    assert len(status) == 1 and "tok/s, float32 |" in status[0]
