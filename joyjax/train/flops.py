"""Counted training FLOPs of the DeepSeek-V3 / JoyAI architecture, device peaks, and MFU.

Counting convention (the one MFU numbers are compared by): matmuls only, 2 FLOPs per multiply-add
(2*m*k*n for an [m, k] x [k, n] product); the backward pass costs twice the forward, so training = 3 x
forward; rematerialisation is not counted; the routed experts count only the ``num_experts_per_tok``
activated ones; causal attention counts half of the full score / value products (the masked half is not
useful work); norms, rotary embeddings, softmax, the activation function and the embedding lookup are
ignored (they are a small fraction of the matmuls and mostly memory bound).

Per token and per layer, with h = hidden_size, H heads, dn/dr/dv = qk_nope/qk_rope/v head dims, rq =
q_lora_rank, rc = kv_lora_rank, S = sequence length (the shapes of ``joyjax/model/attention.py``)::

  q_a 2*h*rq, q_b 2*rq*H*(dn+dr)  (or q 2*h*H*(dn+dr) when q_lora_rank == 0)
  kv_a 2*h*(rc+dr), kv_b 2*rc*H*(dn+dv), o 2*H*dv*h
  scores 2*H*(dn+dr)*S/2, weighted values 2*H*dv*S/2
  dense MLP (SwiGLU: gate, up, down) 3*2*h*I
  MoE: router 2*h*E, routed k*3*2*h*Ie, shared 3*2*h*(n_shared*Ie)
  head 2*h*V; each MTP module: eh_proj 2*(2h)*h + one block (MoE when num_experts > 0) + head 2*h*V
"""

from __future__ import annotations

import numbers

import numpy as np


def _model_cfg(cfg):
  return cfg.model if "model" in cfg else cfg


def _attention_forward(m, seq_len: int) -> tuple[float, float]:
  """(projection FLOPs, score + value FLOPs) of one MLA layer per token, forward."""
  a = m.attention
  h, heads = m.hidden_size, a.num_heads
  qk = a.qk_nope_head_dim + a.qk_rope_head_dim
  if a.q_lora_rank:
    q = 2 * h * a.q_lora_rank + 2 * a.q_lora_rank * heads * qk
  else:
    q = 2 * h * heads * qk
  kv = 2 * h * (a.kv_lora_rank + a.qk_rope_head_dim) + 2 * a.kv_lora_rank * heads * (a.qk_nope_head_dim
                                                                                       + a.v_head_dim)
  o = 2 * heads * a.v_head_dim * h
  keys = seq_len / 2  # causal: each query attends to half the sequence on average
  scores = 2 * heads * qk * keys + 2 * heads * a.v_head_dim * keys
  return float(q + kv + o), float(scores)


def _moe_forward(m) -> dict[str, float]:
  e, h = m.moe, m.hidden_size
  return {
      "moe_router": float(2 * h * e.num_experts),
      "moe_routed": float(e.num_experts_per_tok * 3 * 2 * h * e.intermediate_size),
      "moe_shared": float(3 * 2 * h * e.num_shared_experts * e.intermediate_size),
  }


def flops_per_token(model_cfg, seq_len: int, *, include_mtp: bool = True) -> dict[str, float]:
  """Training FLOPs per token (forward + backward = 3 x forward) of the model, by part, and their 'total'.

  ``model_cfg``: the config or its ``model`` group. Keys: attention_proj, attention_scores, dense_mlp,
  moe_router, moe_routed, moe_shared, head, mtp, total; 'forward' is total / 3.
  """
  m = _model_cfg(model_cfg)
  n_dense = m.first_k_dense
  n_moe = m.num_layers - m.first_k_dense
  proj, scores = _attention_forward(m, seq_len)
  moe = _moe_forward(m)
  dense_mlp = float(3 * 2 * m.hidden_size * m.dense_intermediate_size)
  head = float(2 * m.hidden_size * m.vocab_size)

  fwd = {
      "attention_proj": m.num_layers * proj,
      "attention_scores": m.num_layers * scores,
      "dense_mlp": n_dense * dense_mlp,
      **{k: n_moe * v for k, v in moe.items()},
      "head": head,
      "mtp": 0.0,
  }
  if include_mtp and m.mtp.num_layers:
    block_mlp = sum(moe.values()) if m.moe.num_experts > 0 else dense_mlp
    per_module = 2 * (2 * m.hidden_size) * m.hidden_size + proj + scores + block_mlp + head
    fwd["mtp"] = float(m.mtp.num_layers * per_module)
  out = {k: 3.0 * v for k, v in fwd.items()}
  out["total"] = float(sum(out.values()))
  out["forward"] = out["total"] / 3.0
  return out


# ------------------------------------------------------------------------------------------- peaks

# Dense (no structured sparsity) peak FLOP/s per device, by substring of ``jax.Device.device_kind``
# (lower-cased), checked in order: more specific names first. "float32" on GPUs is the TF32 tensor-core
# peak (XLA's default precision for float32 matmuls there); on TPUs float32 matmuls run as bfloat16 passes
# by default, so the bfloat16 peak is used.
_PEAKS: list[tuple[str, dict[str, float]]] = [
    ("gh200", {"bfloat16": 989e12, "float16": 989e12, "float32": 494.7e12, "float8": 1979e12}),
    ("h200", {"bfloat16": 989e12, "float16": 989e12, "float32": 494.7e12, "float8": 1979e12}),
    ("h100 pcie", {"bfloat16": 756e12, "float16": 756e12, "float32": 378e12, "float8": 1513e12}),
    ("h100 nvl", {"bfloat16": 835e12, "float16": 835e12, "float32": 417.5e12, "float8": 1670e12}),
    ("h100", {"bfloat16": 989e12, "float16": 989e12, "float32": 494.7e12, "float8": 1979e12}),
    ("h800", {"bfloat16": 989e12, "float16": 989e12, "float32": 494.7e12, "float8": 1979e12}),
    ("b200", {"bfloat16": 2250e12, "float16": 2250e12, "float32": 1100e12, "float8": 4500e12}),
    ("a100", {"bfloat16": 312e12, "float16": 312e12, "float32": 156e12}),
    ("a800", {"bfloat16": 312e12, "float16": 312e12, "float32": 156e12}),
    ("l40s", {"bfloat16": 362e12, "float16": 362e12, "float32": 183e12, "float8": 733e12}),
    ("l4", {"bfloat16": 121e12, "float16": 121e12, "float32": 60e12, "float8": 242e12}),
    ("a10", {"bfloat16": 125e12, "float16": 125e12, "float32": 62.5e12}),
    ("v100", {"float16": 125e12, "float32": 15.7e12}),
    ("tpu v7", {"bfloat16": 2307e12, "float32": 2307e12, "float8": 4614e12}),
    ("tpu7", {"bfloat16": 2307e12, "float32": 2307e12, "float8": 4614e12}),
    ("tpu v6 lite", {"bfloat16": 918e12, "float32": 918e12}),
    ("tpu v6e", {"bfloat16": 918e12, "float32": 918e12}),
    ("tpu v5 lite", {"bfloat16": 197e12, "float32": 197e12}),
    ("tpu v5e", {"bfloat16": 197e12, "float32": 197e12}),
    ("tpu v5p", {"bfloat16": 459e12, "float32": 459e12}),
    ("tpu v5", {"bfloat16": 459e12, "float32": 459e12}),
    ("tpu v4", {"bfloat16": 275e12, "float32": 275e12}),
    ("tpu v3", {"bfloat16": 123e12, "float32": 123e12}),
    ("tpu v2", {"bfloat16": 45e12, "float32": 45e12}),
]

_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "f32": "float32", "fp32": "float32",
                  "fp8": "float8", "float8_e4m3fn": "float8", "float8_e5m2": "float8"}


def _dtype_name(dtype) -> str:
  """'bfloat16' for 'bfloat16', 'bf16', jnp.bfloat16 (a scalar type, which has no ``.name``), a numpy dtype, ..."""
  if not isinstance(dtype, str):
    try:
      return np.dtype(dtype).name
    except TypeError:
      pass
  return str(getattr(dtype, "name", dtype)).lower()


def peak_flops_per_device(device_kind: str | None, dtype="bfloat16", *, peak_tflops: float = 0.0) -> float | None:
  """Peak dense FLOP/s of one device of ``device_kind`` (``jax.devices()[0].device_kind``) for matmuls in
  ``dtype``; ``peak_tflops`` > 0 (the config's ``train.peak_tflops``) overrides the table. None when unknown
  (e.g. the CPU): MFU is then not reported."""
  if peak_tflops and peak_tflops > 0:
    return float(peak_tflops) * 1e12
  if not device_kind:
    return None
  name = _dtype_name(dtype)
  name = _DTYPE_ALIASES.get(name, name)
  kind = device_kind.lower()
  for key, peaks in _PEAKS:
    if key in kind:
      return peaks.get(name)
  return None


def mfu(tokens_per_sec_per_device: float, flops_per_token, peak: float | None) -> float | None:
  """Model FLOPs utilisation as a fraction (0.42 = 42%): achieved counted FLOP/s over the peak.
  ``flops_per_token`` is a number or the dict of ``flops_per_token`` (its 'total'). None without a peak."""
  if not peak:
    return None
  f = flops_per_token["total"] if not isinstance(flops_per_token, numbers.Number) else flops_per_token
  return float(tokens_per_sec_per_device) * float(f) / float(peak)
