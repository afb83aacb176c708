"""Pure-functional DeepSeek-V3 / JoyAI-LLM Flash model (Flax NNX modules used via split/merge)."""

from joyjax.model.layout import (ParamInfo, aux_summary, count_params, format_counts, is_info, logical_axes,
                                 param_info, update_router_bias, update_router_biases)
from joyjax.model.lora import add_lora, has_adapters, merge_lora, without_adapters, without_lora, zero_adapters
from joyjax.model.transformer import (MTP_STACK, STACKS, abstract_params, decode_hidden, decode_step, forward,
                                      forward_hidden, head_weights, init, init_cache, logits_from_hidden,
                                      lora_enabled, mtp_decode, stack_sizes)

__all__ = ["MTP_STACK", "STACKS", "ParamInfo", "abstract_params", "add_lora", "aux_summary", "count_params",
           "decode_hidden", "decode_step", "format_counts", "forward", "forward_hidden", "has_adapters", "head_weights",
           "init", "init_cache", "is_info", "logical_axes", "logits_from_hidden", "lora_enabled", "merge_lora",
           "mtp_decode", "param_info", "stack_sizes", "update_router_bias", "update_router_biases", "without_adapters",
           "without_lora", "zero_adapters"]
