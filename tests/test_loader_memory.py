"""Loading reads each tensor straight into its parameter: exact values, bounded memory, and
one clear error for a broken file."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from edgekv import LLM
from edgekv.models import safetensors_reader as reader

from tiny_models import build_tiny_model


def test_tensors_land_exactly_whatever_the_dtype(tmp_path, monkeypatch):
    monkeypatch.setattr(reader, "CHUNK_BYTES", 40)  # conversions go 2 rows of 5 at a time
    torch.manual_seed(0)
    src = {"a": torch.randn(7, 5).half(), "b": torch.randn(3, 4), "c": torch.tensor(2.5),
           "d": torch.randn(5, 2, 3).bfloat16(), "extra": torch.ones(2)}
    save_file(src, tmp_path / "w.safetensors")
    targets = {"a": torch.empty(7, 5), "b": torch.empty(3, 4), "c": torch.empty(()),
               "d": torch.empty(5, 2, 3), "absent": torch.zeros(1)}
    done = reader.load_into(tmp_path / "w.safetensors", targets)
    assert done == {"a", "b", "c", "d"}  # the file's extra tensor is skipped
    for k in done:
        assert torch.equal(targets[k], src[k].float()), k
    assert targets["absent"].item() == 0


def test_a_shape_that_differs_from_the_config_is_one_error(tmp_path):
    save_file({"w": torch.zeros(2, 3)}, tmp_path / "w.safetensors")
    with pytest.raises(ValueError, match=r"w\.safetensors: w has shape \(2, 3\), the config "
                                         r"implies \(3, 2\)"):
        reader.load_into(tmp_path / "w.safetensors", {"w": torch.empty(3, 2)})


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[: len(b) - 100], "is truncated: tensor"),
    (lambda b: b[:5], "is not a safetensors file, or is truncated"),
    (lambda b: b[:8] + b"{not json" + b[17:], "header is not valid JSON"),
])
def test_a_broken_checkpoint_is_one_value_error(llama_dir, tmp_path, damage, message):
    for f in llama_dir.iterdir():
        data = f.read_bytes()
        (tmp_path / f.name).write_bytes(damage(data) if f.suffix == ".safetensors" else data)
    with pytest.raises(ValueError, match=message) as e:
        LLM(tmp_path, kv_format="fp16", kv_memory="4MiB", device="cpu")
    assert "\n" not in str(e.value) and "model.safetensors" in str(e.value)


PEAK = r"""
import json, sys, torch
from edgekv.models import load_model, safetensors_reader
safetensors_reader.CHUNK_BYTES = 2**20
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
base = status("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")  # reset the high-water mark
model = load_model(sys.argv[1], torch.device("cpu"), "float32")[0]
weights = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"peak": status("VmHWM:") - base, "weights": weights}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("saved_dtype", [torch.float32, torch.float16])
def test_loading_peaks_near_the_weights_own_bytes(tmp_path, saved_dtype):
    """The file and the parameters never coexist in memory: with fp32 weights the bytes land
    in the parameters directly, from fp16 through 1 MiB slices. (Before: 2.0x.)"""
    import transformers as tf

    path = build_tiny_model(tmp_path / "m", "llama", tokenizer=False, vocab_size=32000,
                            hidden_size=384, intermediate_size=1024, num_attention_heads=6,
                            head_dim=64)
    if saved_dtype != torch.float32:
        tf.AutoModelForCausalLM.from_pretrained(path, dtype=saved_dtype).save_pretrained(path)
    r = subprocess.run([sys.executable, "-c", PEAK, str(path)], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["weights"] > 100 * 2**20  # fp32 parameters: large enough to dwarf noise
    assert out["peak"] <= 1.15 * out["weights"], out
