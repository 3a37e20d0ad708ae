"""Memory planning: what fits on a GPU, from a model's config alone (no weights).

    resolve.py   --model (config.json, directory, known name, hub id) -> ModelSpec
    weights.py   weight bytes in fp16 / bitsandbytes int8 / nf4
    headroom.py  activations, logits, dequantization buffer, CUDA context, fragmentation
    planner.py   plan_memory(): per (weights, KV format) pair, the KV pool and its context
    controller.py  the KV storage (uniform, per layer, age tiers) with the least predicted
                 KL that holds the request (the quality model: edgekv.auto.quality)
    configs/     config.json of the models known by name, from their published shapes

    from edgekv.plan import plan_memory, resolve_model
    plan = plan_memory(resolve_model("llama-3.2-3b"), "8GiB", context=131072)
    plan.row("nf4", "int4").fits_context, plan.recommendation.row
"""

from .headroom import Headroom, headroom
from .planner import KV_QUALITY_ORDER, MemoryPlan, PlanRow, kv_capacity, plan_memory
from .resolve import KNOWN_MODELS, ModelSpec, config_from_hf_dict, known_name, resolve_model
from .weights import WEIGHT_MODES, WeightMemory, num_params, weight_memory

__all__ = [
    "Headroom", "KNOWN_MODELS", "KV_QUALITY_ORDER", "MemoryPlan", "ModelSpec", "PlanRow",
    "WEIGHT_MODES", "WeightMemory", "config_from_hf_dict", "headroom", "known_name",
    "kv_capacity", "num_params", "plan_memory", "resolve_model", "weight_memory",
]
