"""Pure-functional DeepSeek-V3 / JoyAI-LLM Flash model (Flax NNX modules used via split/merge)."""

from joyjax.model.transformer import (abstract_params, decode_step, forward, forward_hidden, head_weights, init,
                                      init_cache, logical_axes, logits_from_hidden, stack_sizes)

__all__ = ["abstract_params", "decode_step", "forward", "forward_hidden", "head_weights", "init", "init_cache",
           "logical_axes", "logits_from_hidden", "stack_sizes"]
