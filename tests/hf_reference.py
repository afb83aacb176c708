"""Tiny random transformers DeepseekV3ForCausalLM models: the independent reference for parity tests."""

import numpy as np
import torch
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

BASE = dict(vocab_size=97, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2, n_group=1,
            topk_group=1, n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16,
            qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, routed_scaling_factor=2.5,
            max_position_embeddings=256, initializer_range=0.15, rms_norm_eps=1e-6, tie_word_embeddings=False)


def make_hf_model(seed=0, **overrides):
  torch.manual_seed(seed)
  kw = dict(BASE, **overrides)
  config = DeepseekV3Config(**kw)
  model = DeepseekV3ForCausalLM._from_config(config, attn_implementation="eager", dtype=torch.float32)
  model.eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):  # non-trivial norms so a swapped norm is caught
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
    for name, b in model.named_buffers():
      if name.endswith("e_score_correction_bias"):  # non-zero: selection must differ from plain top-k
        b.copy_(0.3 * torch.randn_like(b))
  return model


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.from_numpy(np.asarray(tokens)).long()).logits.float().numpy()
