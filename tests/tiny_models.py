"""Tiny random checkpoints of each supported family, built with transformers and saved with
safetensors, plus a small byte-level BPE tokenizer. Used by the engine and API tests."""

from __future__ import annotations

from pathlib import Path

import torch

FAMILIES = ("llama", "llama3", "mistral", "qwen2", "qwen3")


def hf_config(family: str, **overrides):
    """A transformers config: 4 query heads per KV head (GQA), 2 layers, head_dim 32."""
    import transformers as tf

    common = dict(vocab_size=320, hidden_size=128, intermediate_size=256,
                  num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, head_dim=32,
                  max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=False,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    common.update(overrides)
    if family == "llama":
        return tf.LlamaConfig(**common)
    if family == "llama3":  # Llama 3.1 RoPE scaling, tied embeddings as in Llama 3.2
        common.update(tie_word_embeddings=True)
        cfg = tf.LlamaConfig(**common)
        cfg.rope_parameters = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 64}
        return cfg
    if family == "mistral":
        return tf.MistralConfig(sliding_window=None, **common)
    if family == "qwen2":
        return tf.Qwen2Config(**common)
    if family == "qwen3":
        return tf.Qwen3Config(**common)
    raise ValueError(family)


def build_tiny_model(path: Path, family: str = "llama", seed: int = 0, tokenizer: bool = True,
                     **overrides) -> Path:
    """Random-weight fp32 model of ``family`` saved under ``path``; returns ``path``."""
    import transformers as tf

    torch.manual_seed(seed)
    cfg = hf_config(family, **overrides)
    model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # larger-than-default weights give peaked, tie-free logits
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    model.save_pretrained(path, safe_serialization=True)
    if tokenizer:
        build_tokenizer(cfg.vocab_size).save_pretrained(path)
    return Path(path)


def build_tokenizer(vocab_size: int = 320):
    """A byte-level BPE tokenizer trained on a few sentences, with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = ["Once upon a time there was a small cache that held many keys and values.",
            "The quick brown fox jumps over the lazy dog. Ünïcödé: ça va, naïve café.",
            "Hello! How are you today? I am fine, thank you for asking."] * 20
    tok.train_from_iterator(text, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    fast.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    return fast
