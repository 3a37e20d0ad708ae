"""Model families over the paged KV cache, one file each, keyed by HF architecture string.

    llama.py    LlamaForCausalLM (Llama 2/3/3.1/3.2, llama3 RoPE scaling): the decoder
    mistral.py  MistralForCausalLM
    qwen2.py    Qwen2ForCausalLM (q/k/v bias)
    qwen3.py    Qwen3ForCausalLM (q/k norm)
    loader.py   load_model(dir or hub id) -> (model, ModelConfig, dir)
    cpu_fused.py  one decoding sequence on a CPU: each decoder layer as one compiled call
"""

from .attention import AttentionMetadata
from .config import ModelConfig
from .loader import load_model, resolve_model_dir
from .registry import MODEL_REGISTRY, get_model_class, register_model

__all__ = ["AttentionMetadata", "MODEL_REGISTRY", "ModelConfig", "get_model_class",
           "load_model", "register_model", "resolve_model_dir"]
