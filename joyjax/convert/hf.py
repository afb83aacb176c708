"""Hugging Face DeepSeek-V3 / JoyAI-LLM Flash checkpoints <-> joyjax params.

HF linear weights are [out, in]; joyjax kernels are [in, out] with heads split out. Routed experts are stored
per expert (``mlp.experts.{j}.gate_proj.weight``; the fused ``gate_up_proj`` layout is read too). The MTP
modules sit at layer index ``num_hidden_layers + k``. Quantized checkpoints (``convert/quantized.py``) are
dequantised on the way in: FP8 block-scaled weights (``weight_scale_inv``, one float32 scale per 128x128 block,
as DeepSeek-V3 ships) and compressed-tensors packed INT4 (``weight_packed`` / ``weight_scale``); export writes
either on request. Import streams tensor by tensor into preallocated output arrays: host memory is the output
plus one tensor.
"""

from __future__ import annotations

import json
import logging
import os
import re

import jax
import ml_collections
import ml_dtypes
import numpy as np

from configs import base as base_config
from joyjax import model as jmodel
from joyjax import quant
from joyjax.config import QUANT_FORMATS, validate
from joyjax.errors import CheckpointError, ConversionError
from joyjax.convert import quantized
from joyjax.convert.safetensors_io import CheckpointFormatError, SafetensorsReader, ShardedWriter

log = logging.getLogger(__name__)
MODEL_TYPES = ("deepseek_v3", "joyai_llm_flash")


# -------------------------------------------------------------------------------------------------- config


def _rope_dict(hf: dict) -> dict:
  """The rope settings, whether written by transformers 5 (rope_parameters) or 4 (rope_theta + rope_scaling)."""
  rope = dict(hf.get("rope_parameters") or {})
  if hf.get("rope_scaling"):
    for k, v in hf["rope_scaling"].items():
      rope.setdefault(k, v)
  rope.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
  rope["rope_type"] = rope.get("rope_type") or rope.get("type") or "default"
  return rope


def config_from_hf(hf: dict):
  """A validated joyjax config whose model group reproduces the HF config."""
  mt = hf.get("model_type")
  if mt not in MODEL_TYPES:
    raise ConversionError(f"config.json model_type is {mt!r}; joyjax reads {MODEL_TYPES}")
  if hf.get("attention_bias"):
    raise ConversionError("config.json attention_bias=true is not supported (DeepSeek-V3 has no attention biases)")
  if hf.get("hidden_act", "silu") != "silu":
    raise ConversionError(f"config.json hidden_act={hf['hidden_act']!r}: only silu is supported")
  cfg = base_config.get_config()
  m = cfg.model
  m.vocab_size = hf["vocab_size"]
  m.hidden_size = hf["hidden_size"]
  m.num_layers = hf["num_hidden_layers"]
  m.first_k_dense = min(hf.get("first_k_dense_replace", 0), hf["num_hidden_layers"])
  m.dense_intermediate_size = hf["intermediate_size"]
  m.rms_norm_eps = float(hf.get("rms_norm_eps", 1e-6))
  m.tie_embeddings = bool(hf.get("tie_word_embeddings", False))
  m.max_position_embeddings = hf.get("max_position_embeddings", 4096)
  m.init_std = float(hf.get("initializer_range", 0.02))
  m.dtype = "float32"
  a = m.attention
  a.num_heads = hf["num_attention_heads"]
  a.q_lora_rank = hf.get("q_lora_rank") or 0
  a.kv_lora_rank = hf["kv_lora_rank"]
  a.qk_nope_head_dim = hf["qk_nope_head_dim"]
  a.qk_rope_head_dim = hf["qk_rope_head_dim"]
  a.v_head_dim = hf["v_head_dim"]
  rope = _rope_dict(hf)
  r = m.rope
  r.theta = float(rope["rope_theta"])
  r.interleave = bool(hf.get("rope_interleave", True))
  if rope["rope_type"] == "yarn":
    r.scaling = "yarn"
    r.original_max_position = int(rope["original_max_position_embeddings"])
    r.factor = float(rope.get("factor") or m.max_position_embeddings / r.original_max_position)
    r.beta_fast = float(rope.get("beta_fast") or 32.0)
    r.beta_slow = float(rope.get("beta_slow") or 1.0)
    r.mscale = float(rope.get("mscale") or 0.0)
    r.mscale_all_dim = float(rope.get("mscale_all_dim") or 0.0)
    if rope.get("attention_factor") is not None:
      raise ConversionError("rope attention_factor given explicitly is not supported; use mscale / mscale_all_dim")
  elif rope["rope_type"] != "default":
    raise ConversionError(f"rope type {rope['rope_type']!r} is not supported (default or yarn)")
  e = m.moe
  e.num_experts = hf.get("n_routed_experts") or 0
  e.num_experts_per_tok = hf.get("num_experts_per_tok") or 1
  e.intermediate_size = hf.get("moe_intermediate_size") or 1
  e.num_shared_experts = hf.get("n_shared_experts") or 0
  e.n_group = hf.get("n_group") or 1
  e.topk_group = hf.get("topk_group") or 1
  e.routed_scaling_factor = float(hf.get("routed_scaling_factor", 1.0))
  e.norm_topk_prob = bool(hf.get("norm_topk_prob", True))
  e.scoring_func = hf.get("scoring_func", "sigmoid")
  m.mtp.num_layers = hf.get("num_nextn_predict_layers", 0) or 0
  validate(cfg)
  return cfg


def config_to_hf(cfg) -> dict:
  """config.json for transformers (both the 4.x rope_scaling and the 5.x rope_parameters spellings)."""
  m = cfg.model if "model" in cfg else cfg
  a, r, e = m.attention, m.rope, m.moe
  rope_params = {"rope_type": "default", "rope_theta": r.theta}
  rope_scaling = None
  if r.scaling == "yarn":
    rope_scaling = {"type": "yarn", "rope_type": "yarn", "factor": r.factor,
                    "original_max_position_embeddings": r.original_max_position, "beta_fast": r.beta_fast,
                    "beta_slow": r.beta_slow, "mscale": r.mscale, "mscale_all_dim": r.mscale_all_dim}
    rope_params = dict(rope_scaling, rope_theta=r.theta)
    del rope_params["type"]
  return {
      "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
      "vocab_size": m.vocab_size, "hidden_size": m.hidden_size, "intermediate_size": m.dense_intermediate_size,
      "moe_intermediate_size": e.intermediate_size, "num_hidden_layers": m.num_layers,
      "num_attention_heads": a.num_heads, "num_key_value_heads": a.num_heads,
      "n_shared_experts": e.num_shared_experts, "n_routed_experts": e.num_experts,
      "routed_scaling_factor": e.routed_scaling_factor, "kv_lora_rank": a.kv_lora_rank,
      "q_lora_rank": a.q_lora_rank or None, "qk_rope_head_dim": a.qk_rope_head_dim, "v_head_dim": a.v_head_dim,
      "qk_nope_head_dim": a.qk_nope_head_dim, "n_group": e.n_group, "topk_group": e.topk_group,
      "num_experts_per_tok": e.num_experts_per_tok, "first_k_dense_replace": m.first_k_dense,
      "norm_topk_prob": e.norm_topk_prob, "scoring_func": e.scoring_func, "hidden_act": "silu",
      "max_position_embeddings": m.max_position_embeddings, "initializer_range": m.init_std,
      "rms_norm_eps": m.rms_norm_eps, "tie_word_embeddings": m.tie_embeddings, "rope_theta": r.theta,
      "rope_scaling": rope_scaling, "rope_parameters": rope_params, "rope_interleave": r.interleave,
      "attention_bias": False, "attention_dropout": 0.0, "num_nextn_predict_layers": m.mtp.num_layers,
      "bos_token_id": 0, "eos_token_id": 1, "torch_dtype": "bfloat16", "dtype": "bfloat16",
  }


# --------------------------------------------------------------------------------------------- tensor map
# Each entry: HF name -> (joyjax path as a tuple, stack index or None, kind). Kinds say how to reshape an
# HF [out, in] matrix into the joyjax layout and back.


def _block_entries(m, prefix: str, moe: bool, base_path: tuple, idx: int) -> list:
  a = m.attention
  out = []

  def add(hf, path, kind):
    out.append((f"{prefix}.{hf}", base_path + path, idx, kind))

  add("input_layernorm.weight", ("attn_norm", "scale"), "vector")
  add("post_attention_layernorm.weight", ("mlp_norm", "scale"), "vector")
  if a.q_lora_rank:
    add("self_attn.q_a_proj.weight", ("attn", "q_a"), "linear")
    add("self_attn.q_a_layernorm.weight", ("attn", "q_a_norm", "scale"), "vector")
    add("self_attn.q_b_proj.weight", ("attn", "q_b"), "linear_split_out")
  else:
    add("self_attn.q_proj.weight", ("attn", "q"), "linear_split_out")
  add("self_attn.kv_a_proj_with_mqa.weight", ("attn", "kv_a"), "linear")
  add("self_attn.kv_a_layernorm.weight", ("attn", "kv_a_norm", "scale"), "vector")
  add("self_attn.kv_b_proj.weight", ("attn", "kv_b"), "linear_split_out")
  add("self_attn.o_proj.weight", ("attn", "o"), "linear_split_in")
  if moe:
    add("mlp.gate.weight", ("mlp", "router"), "linear")
    add("mlp.gate.e_score_correction_bias", ("mlp", "router_bias"), "vector")
    for j in range(m.moe.num_experts):
      out.append((f"{prefix}.mlp.experts.{j}.gate_proj.weight", base_path + ("mlp", "wi_gate"), (idx, j), "linear"))
      out.append((f"{prefix}.mlp.experts.{j}.up_proj.weight", base_path + ("mlp", "wi_up"), (idx, j), "linear"))
      out.append((f"{prefix}.mlp.experts.{j}.down_proj.weight", base_path + ("mlp", "wo"), (idx, j), "linear"))
    if m.moe.num_shared_experts:
      for w in ("gate", "up", "down"):
        add(f"mlp.shared_experts.{w}_proj.weight", ("mlp", "shared", w), "linear")
  else:
    for w in ("gate", "up", "down"):
      add(f"mlp.{w}_proj.weight", ("mlp", w), "linear")
  return out


def tensor_map(cfg) -> list:
  """(hf_name, joyjax path, index, kind) for every tensor of the model."""
  m = cfg.model if "model" in cfg else cfg
  entries = [("model.embed_tokens.weight", ("embed", "embedding"), None, "plain"),
             ("model.norm.weight", ("final_norm", "norm", "scale"), None, "vector")]
  if not m.tie_embeddings:
    entries.append(("lm_head.weight", ("lm_head", "kernel"), None, "linear"))
  for i in range(m.num_layers):
    moe = i >= m.first_k_dense
    stack, idx = ("moe_layers", i - m.first_k_dense) if moe else ("dense_layers", i)
    entries += _block_entries(m, f"model.layers.{i}", moe, (stack,), idx)
  for k in range(m.mtp.num_layers):
    p = f"model.layers.{m.num_layers + k}"
    entries += [(f"{p}.enorm.weight", ("mtp", "enorm", "scale"), k, "vector"),
                (f"{p}.hnorm.weight", ("mtp", "hnorm", "scale"), k, "vector"),
                (f"{p}.eh_proj.weight", ("mtp", "eh_proj"), k, "linear"),
                (f"{p}.shared_head.norm.weight", ("mtp", "final_norm", "scale"), k, "vector")]
    entries += _block_entries(m, p, m.moe.num_experts > 0, ("mtp", "block"), k)
  return entries


def _to_joyjax(w: np.ndarray, kind: str, target_shape: tuple) -> np.ndarray:
  if kind in ("plain", "vector"):
    return w
  if kind == "linear":
    return w.T
  if kind == "linear_split_out":  # [heads*d, in] -> [in, heads, d]
    return w.T.reshape(target_shape)
  if kind == "linear_split_in":  # [out, heads*d] -> [heads, d, out]
    return w.T.reshape(target_shape)
  raise AssertionError(kind)


def _to_hf(w: np.ndarray, kind: str) -> np.ndarray:
  if kind in ("plain", "vector"):
    return w
  if kind == "linear":
    return w.T
  if kind == "linear_split_out":  # [in, heads, d] -> [heads*d, in]
    return w.reshape(w.shape[0], -1).T
  if kind == "linear_split_in":  # [heads, d, out] -> [out, heads*d]
    return w.reshape(-1, w.shape[-1]).T
  raise AssertionError(kind)


def _hf_shape(kind: str, target_shape: tuple) -> tuple:
  return _to_hf(np.empty(target_shape, np.uint8), kind).shape


def _get(tree, path):
  for p in path:
    tree = tree[p]
  return tree


# ------------------------------------------------------------------------------------------------- import


def _fused_experts(reader, prefix, m):
  """transformers-5 fused expert tensors, if the checkpoint uses them."""
  gu, dn = f"{prefix}.mlp.experts.gate_up_proj", f"{prefix}.mlp.experts.down_proj"
  return (gu, dn) if gu in reader and dn in reader else None


def import_checkpoint(hf_dir: str, *, param_dtype: str = "float32"):
  """Reads a HF checkpoint directory. Returns (config, params) with params a dict of numpy arrays."""
  if not os.path.isdir(hf_dir):
    raise CheckpointError(f"Hugging Face checkpoint directory {hf_dir} does not exist; --hf-dir takes a local "
                          "directory holding config.json and *.safetensors")
  cfg_path = os.path.join(hf_dir, "config.json")
  if not os.path.exists(cfg_path):
    raise ConversionError(f"{hf_dir}: no config.json; point --hf-dir at a Hugging Face model directory")
  with open(cfg_path) as f:
    hf = json.load(f)
  reader = SafetensorsReader(hf_dir)
  n_mtp = hf.get("num_nextn_predict_layers", 0) or 0
  if n_mtp and not any(k.startswith(f"model.layers.{hf['num_hidden_layers']}.") for k in reader.keys()):
    # transformers' save_pretrained drops the MTP layers; the model is complete without them.
    log.warning("config.json has num_nextn_predict_layers=%d but the checkpoint has no MTP tensors: "
                "importing without MTP", n_mtp)
    hf = dict(hf, num_nextn_predict_layers=0)
  cfg = config_from_hf(hf)
  cfg.model.param_dtype = param_dtype
  abstract = jmodel.abstract_params(cfg)
  params = _allocate(abstract)
  used = set()
  entries = tensor_map(cfg)
  fused = {}
  for i in range(cfg.model.first_k_dense, cfg.model.num_layers):
    p = f"model.layers.{i}"
    if _fused_experts(reader, p, cfg.model):
      fused[p] = True
  for k in range(cfg.model.mtp.num_layers):
    p = f"model.layers.{cfg.model.num_layers + k}"
    if _fused_experts(reader, p, cfg.model):
      fused[p] = True
  missing = []
  for hf_name, path, idx, kind in entries:
    prefix = hf_name.split(".mlp.experts.")[0] if ".mlp.experts." in hf_name else None
    if prefix in fused:
      continue
    if hf_name not in reader and quantized.int4_names(hf_name)[0] not in reader:
      missing.append(hf_name)
      continue
    dest = _get(params, path)
    target = dest[idx] if idx is not None else dest
    w = _load_tensor(reader, hf_name, kind, target.shape, used)
    target[...] = _to_joyjax(w, kind, target.shape)
  for prefix in fused:
    _load_fused(reader, prefix, cfg, params, used)
  if missing:
    raise ConversionError(f"checkpoint {hf_dir} is missing {len(missing)} tensor(s), first: {missing[:5]}")
  ignorable = re.compile(r"(rotary_emb\.inv_freq$|\.shared_head\.head\.weight$|"
                         rf"^model\.layers\.({'|'.join(str(cfg.model.num_layers + k) for k in range(cfg.model.mtp.num_layers)) or 'x'})\.embed_tokens\.weight$)")
  unexpected = [k for k in reader.keys() if k not in used and not ignorable.search(k)]
  if unexpected:
    raise ConversionError(f"checkpoint {hf_dir} has {len(unexpected)} tensor(s) joyjax does not know, first: "
                          f"{unexpected[:5]} (is num_hidden_layers / n_routed_experts in config.json right?)")
  return cfg, params


def _allocate(abstract):
  return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract)


def _load_tensor(reader, name, kind, target_shape, used):
  """One weight as float32 in HF layout: stored plainly, as FP8 with its ``weight_scale_inv`` block scales, or as
  compressed-tensors packed INT4 (``weight_packed`` / ``weight_scale`` / ``weight_shape``), dequantized."""
  want = _hf_shape(kind, tuple(target_shape))
  packed = quantized.int4_names(name)
  if name not in reader and packed[0] in reader:
    used.update(n for n in packed if n in reader)
    return quantized.int4_weight(reader, name, want)
  got = reader.shape(name)
  if tuple(got) != tuple(want):
    raise ConversionError(f"tensor {name!r} has shape {tuple(got)}, expected {tuple(want)} from config.json")
  w = reader.get(name)
  used.add(name)
  scale_name = name + "_scale_inv"
  if scale_name in reader:
    used.add(scale_name)
    return quantized.fp8_weight(name, w, reader.get(scale_name))
  if str(w.dtype).startswith("float8"):
    raise ConversionError(f"tensor {name!r} is FP8 but {scale_name!r} (its block scales) is missing")
  return np.asarray(w, np.float32)


def _load_fused(reader, prefix, cfg, params, used):
  m = cfg.model
  stack, idx = _stack_of(prefix, m)
  mlp = _get(params, stack)["mlp"]
  gu_name, dn_name = f"{prefix}.mlp.experts.gate_up_proj", f"{prefix}.mlp.experts.down_proj"
  e, i, h = m.moe.num_experts, m.moe.intermediate_size, m.hidden_size
  for name, want in ((gu_name, (e, 2 * i, h)), (dn_name, (e, h, i))):
    if reader.shape(name) != want:
      raise ConversionError(f"tensor {name!r} has shape {reader.shape(name)}, expected {want} from config.json")
  gu = np.asarray(reader.get(gu_name), np.float32)
  mlp["wi_gate"][idx] = np.swapaxes(gu[:, :i], 1, 2)
  mlp["wi_up"][idx] = np.swapaxes(gu[:, i:], 1, 2)
  mlp["wo"][idx] = np.swapaxes(np.asarray(reader.get(dn_name), np.float32), 1, 2)
  used.update([gu_name, dn_name])


def _stack_of(prefix, m):
  i = int(prefix.split(".")[2])
  if i >= m.num_layers:
    return ("mtp", "block"), i - m.num_layers
  if i < m.first_k_dense:
    return ("dense_layers",), i
  return ("moe_layers",), i - m.first_k_dense


# ------------------------------------------------------------------------------------------------- export


def export_checkpoint(cfg, params, out_dir: str, *, dtype: str = "bfloat16", max_shard_bytes: int = 2 << 30,
                      quantize: str | None = None):
  """Writes ``params`` as a HF DeepSeek-V3 checkpoint (sharded safetensors + index + config.json).

  The MTP modules go to layers ``num_hidden_layers + k`` with copies of the embedding and head, as DeepSeek-V3
  checkpoints store them. Params of a LoRA run (``model.lora.rank`` > 0: adapters beside the weights) are
  merged first (``model.merge_lora``: W + alpha / r * A @ B), so the checkpoint never carries adapters.

  ``quantize`` (see ``convert/quantized.py``): None writes every tensor in ``dtype``; "fp8" stores the decoder
  layers' linear weights as DeepSeek-V3 does (float8_e4m3fn + ``weight_scale_inv`` per 128x128 block); "int4"
  stores the weights of ``quant.targets`` as compressed-tensors packed INT4 in groups of ``quant.group_size``
  along the input: exactly the numbers QAT's ``quant.fake_quantize_params`` computes with ``quant.format=int4``.
  Quantization starts from the float32 params, never from their ``dtype`` rounding; the other tensors are
  written in ``dtype``.
  """
  np_dtype = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}[dtype]
  if quantize not in (None,) + QUANT_FORMATS[1:]:
    raise ConversionError(f"quantize={quantize!r}: expected one of {QUANT_FORMATS[1:]} (or None)")
  m = cfg.model if "model" in cfg else cfg
  if jmodel.has_adapters(params):
    params = jmodel.merge_lora(cfg, params)
    cfg = jmodel.without_lora(cfg)
  int4_selected = _int4_selection(cfg) if quantize == "int4" else None
  os.makedirs(out_dir, exist_ok=True)
  writer = ShardedWriter(out_dir, max_shard_bytes)
  unquantized_linears = []
  for hf_name, path, idx, kind in tensor_map(cfg):
    w = np.asarray(_get(params, path))
    if idx is not None:
      w = w[idx]
    w_hf = _to_hf(np.asarray(w, np.float32), kind)
    linear = quantized.is_linear(hf_name)
    if quantize == "fp8" and linear:
      tensors = quantized.fp8_tensors(hf_name, w_hf)
    elif quantize == "int4" and linear and _get(int4_selected, path):
      tensors = quantized.int4_tensors(hf_name, w_hf, cfg.quant.group_size)
    else:
      out_dtype = np.float32 if hf_name.endswith("e_score_correction_bias") else np_dtype
      tensors = [(hf_name, w_hf.astype(out_dtype))]
      if kind.startswith("linear"):
        unquantized_linears.append(quantized.module_of(hf_name))
    for name, array in tensors:
      writer.add(name, array)
  for k in range(m.mtp.num_layers):
    p = f"model.layers.{m.num_layers + k}"
    writer.add(f"{p}.embed_tokens.weight", np.asarray(params["embed"]["embedding"], np.float32).astype(np_dtype))
    head = np.asarray(jmodel.head_weights(cfg, params), np.float32).T
    writer.add(f"{p}.shared_head.head.weight", head.astype(np_dtype))
    unquantized_linears.append(f"{p}.shared_head.head")
  writer.close()
  hf = config_to_hf(cfg)
  hf["torch_dtype"] = hf["dtype"] = dtype
  if quantize == "fp8":
    hf["quantization_config"] = quantized.fp8_quantization_config()
  elif quantize == "int4":
    hf["quantization_config"] = quantized.int4_quantization_config(cfg.quant.group_size, unquantized_linears)
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(hf, f, indent=2)


def _int4_selection(cfg):
  """``quant.selection``'s tree (True where a weight is INT4-quantized) for ``quant.targets``, whatever
  ``quant.format`` the run trained with (post-training quantization of a float run selects the same weights);
  a group size that does not divide a selected weight's input dimension is a ConfigError naming the groups."""
  cfg = ml_collections.ConfigDict(cfg.to_dict())
  cfg.quant.format = "int4"
  quant.check(cfg)
  return quant.selection(cfg)


__all__ = ["import_checkpoint", "export_checkpoint", "config_from_hf", "config_to_hf", "tensor_map",
           "ConversionError", "CheckpointFormatError"]
