"""Quantized Hugging Face checkpoint layouts: FP8 block-scaled (DeepSeek-V3) and packed INT4 (compressed-tensors).

The numbers come from ``joyjax.quant`` (the formats QAT simulates); this module only lays them out the way
inference engines read them, and reads them back.

FP8, as DeepSeek-V3 ships: each quantized ``<m>.weight`` [out, in] is float8_e4m3fn beside ``<m>.weight_scale_inv``
float32 [ceil(out/128), ceil(in/128)] (w = w_fp8 * scale_inv per 128x128 block, edge blocks ragged); config.json
carries ``quantization_config = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
"weight_block_size": [128, 128]}``. transformers' FineGrainedFP8 quantizer (no GPU: it dequantizes) and vLLM load it.

INT4, compressed-tensors ``pack-quantized`` (what vLLM's W4A16 path and transformers' compressed-tensors
integration read, and the layout of Kimi-K2-Thinking's INT4 release, a DeepSeek-V3 architecture):
``<m>.weight_packed`` int32 [out, ceil(in/8)], ``<m>.weight_scale`` [out, in/group] and ``<m>.weight_shape``
int32 [2] = (out, in). The packing is compressed-tensors' ``pack_to_int32``: each value q in [-8, 7] is stored
as the unsigned nibble q + 8, eight consecutive input elements per int32, element k at bits 4k..4k+3 (the first
element in the lowest bits), the row zero-padded to a multiple of 8. That differs from ``quant.pack_int4``
(two's-complement nibbles, two per uint8), so the int32 packing lives here as a detail of this format.
Scales are written as float32, so the reloaded weights equal ``quant.fake_quantize``'s bit for bit (an engine
serving in bf16 rounds them on load).

Which weights are quantized: FP8 follows DeepSeek-V3's checkpoints and transformers' defaults (every
``nn.Linear`` of the decoder layers and the fused experts; never the embeddings, ``lm_head``, norms, the router
``mlp.gate`` or its ``e_score_correction_bias``, nor the MTP module's ``eh_proj``). INT4 quantizes what QAT
fake-quantizes (``quant.selection`` of ``quant.targets``, decided by the caller) and lists every other linear in
the config's ``ignore``.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np

from joyjax import quant
from joyjax.errors import CheckpointFormatError, ConversionError

FP8_SCALE_SUFFIX = "_scale_inv"
INT4_SUFFIXES = ("weight_packed", "weight_scale", "weight_shape")
NIBBLES_PER_INT32 = 8

# quant's formats under jit, compiled once per weight shape (a checkpoint repeats a few shapes thousands of times:
# one compiled program each instead of op-by-op dispatch). The numbers are the same eagerly: quant's scales
# multiply by constant reciprocals, so jit and shape do not change them.
_fp8_quantize = jax.jit(quant.fp8_block_quantize)
_fp8_dequantize = jax.jit(quant.fp8_block_dequantize)
_int4_quantize = jax.jit(quant.int4_quantize, static_argnums=(1, 2))
_int4_dequantize = jax.jit(quant.int4_dequantize, static_argnums=(2, 3))

# The decoder layers' linear weights (attention projections, dense MLP, shared and routed experts), of the main
# layers and of the MTP modules' blocks; not the router (mlp.gate), eh_proj, norms, embeddings or heads.
_LINEAR = re.compile(r"^model\.layers\.\d+\.(self_attn\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)"
                     r"|mlp\.(shared_experts\.|experts\.\d+\.)?(gate_proj|up_proj|down_proj))\.weight$")


def is_linear(hf_name: str) -> bool:
  """Whether ``hf_name`` is a decoder-layer linear weight, the tensors DeepSeek-V3 stores in FP8."""
  return bool(_LINEAR.match(hf_name))


def module_of(hf_name: str) -> str:
  """``model.layers.3.self_attn.o_proj.weight`` -> ``model.layers.3.self_attn.o_proj``."""
  return hf_name[:-len(".weight")] if hf_name.endswith(".weight") else hf_name


# ------------------------------------------------------------------------------------------------- FP8


def fp8_quantization_config() -> dict:
  """config.json's ``quantization_config`` of a DeepSeek-V3 FP8 checkpoint."""
  return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
          "weight_block_size": list(quant.FP8_BLOCK_SHAPE)}


def fp8_tensors(hf_name: str, w_hf: np.ndarray) -> list[tuple[str, np.ndarray]]:
  """(name, array) pairs storing the HF weight ``w_hf`` [out, in] in FP8 with its block scales."""
  q, scale_inv = _fp8_quantize(w_hf)
  return [(hf_name, np.asarray(q)), (hf_name + FP8_SCALE_SUFFIX, np.asarray(scale_inv, np.float32))]


def fp8_weight(name: str, w: np.ndarray, scale_inv: np.ndarray) -> np.ndarray:
  """An FP8 weight [out, in] and its ``weight_scale_inv`` -> float32; a scale grid that does not match the weight
  in 128x128 blocks is a CheckpointFormatError naming the tensor."""
  want = tuple(-(-n // b) for n, b in zip(w.shape, quant.FP8_BLOCK_SHAPE))
  if w.ndim != 2 or tuple(scale_inv.shape) != want:
    raise CheckpointFormatError(f"{name}{FP8_SCALE_SUFFIX} has shape {tuple(scale_inv.shape)}, expected {want} "
                                f"for the {tuple(w.shape)} weight {name} in "
                                f"{quant.FP8_BLOCK_SHAPE[0]}x{quant.FP8_BLOCK_SHAPE[1]} blocks: the checkpoint "
                                "is corrupt or not DeepSeek-V3 block-quantized")
  return np.asarray(_fp8_dequantize(jnp.asarray(w), jnp.asarray(scale_inv, jnp.float32)))


# ------------------------------------------------------------------------------------------------ INT4


def int4_quantization_config(group_size: int, ignore: list[str]) -> dict:
  """config.json's ``quantization_config`` of a compressed-tensors pack-quantized W4A16 checkpoint (symmetric
  group-wise INT4 weights, activations unquantized); ``ignore`` names the linear modules left unquantized."""
  weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": group_size,
             "dynamic": False, "actorder": None, "block_structure": None, "observer": "minmax",
             "observer_kwargs": {}}
  return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
          "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                        "output_activations": None, "format": "pack-quantized"}},
          "ignore": sorted(ignore), "kv_cache_scheme": None}


def pack_int32(q: np.ndarray) -> np.ndarray:
  """int values in [-8, 7], [rows, cols] -> int32 [rows, ceil(cols/8)] in compressed-tensors' nibble order."""
  rows, cols = q.shape
  u = (np.asarray(q, np.int64) + 8).astype(np.uint32)
  pad = -cols % NIBBLES_PER_INT32
  u = np.pad(u, ((0, 0), (0, pad))).reshape(rows, -1, NIBBLES_PER_INT32)
  shifts = (4 * np.arange(NIBBLES_PER_INT32)).astype(np.uint32)
  return np.bitwise_or.reduce(u << shifts, axis=-1).astype(np.uint32).view(np.int32)


def unpack_int32(packed: np.ndarray, cols: int) -> np.ndarray:
  """Inverse of ``pack_int32``: int8 [rows, cols] in [-8, 7]."""
  u = np.asarray(packed, np.int32).view(np.uint32)
  shifts = (4 * np.arange(NIBBLES_PER_INT32)).astype(np.uint32)
  nib = (u[..., None] >> shifts) & np.uint32(0xF)
  return (nib.reshape(u.shape[0], -1)[:, :cols].astype(np.int16) - 8).astype(np.int8)


def int4_tensors(hf_name: str, w_hf: np.ndarray, group_size: int) -> list[tuple[str, np.ndarray]]:
  """(name, array) pairs storing the HF weight [out, in] as packed INT4 with its group scales."""
  out, inp = w_hf.shape
  if inp % group_size:
    raise ConversionError(f"int4 export: {hf_name} has input dimension {inp}, which group size {group_size} does "
                          "not divide; choose a group size that divides every quantized weight's input dimension")
  q, scale = _int4_quantize(w_hf, group_size, 1)
  m = module_of(hf_name)
  return [(f"{m}.weight_packed", pack_int32(np.asarray(q))), (f"{m}.weight_scale", np.asarray(scale, np.float32)),
          (f"{m}.weight_shape", np.asarray([out, inp], np.int32))]


def int4_names(hf_name: str) -> tuple[str, str, str]:
  m = module_of(hf_name)
  return tuple(f"{m}.{s}" for s in INT4_SUFFIXES)


def int4_weight(reader, hf_name: str, want: tuple) -> np.ndarray:
  """The float32 [out, in] weight of a pack-quantized module; shapes checked against ``want`` and each other."""
  packed_name, scale_name, shape_name = int4_names(hf_name)
  for n in (scale_name, shape_name):
    if n not in reader:
      raise ConversionError(f"tensor {packed_name!r} is packed INT4 but {n!r} is missing")
  shape = tuple(int(x) for x in np.asarray(reader.get(shape_name)).reshape(-1))
  if shape != tuple(want):
    raise ConversionError(f"tensor {shape_name!r} says {shape}, expected {tuple(want)} from config.json")
  out, inp = shape
  packed_want = (out, -(-inp // NIBBLES_PER_INT32))
  if reader.shape(packed_name) != packed_want or str(reader.get(packed_name).dtype) != "int32":
    raise CheckpointFormatError(f"{packed_name} has shape {reader.shape(packed_name)} "
                                f"({reader.get(packed_name).dtype}), expected int32 {packed_want} for an "
                                f"{shape} weight with 8 INT4 values per int32")
  s_shape = reader.shape(scale_name)
  if len(s_shape) != 2 or s_shape[0] != out or not s_shape[1] or inp % s_shape[1]:
    raise CheckpointFormatError(f"{scale_name} has shape {s_shape}, expected ({out}, {inp} / group size) for the "
                                f"{shape} weight {packed_name}")
  group = inp // s_shape[1]
  q = unpack_int32(np.asarray(reader.get(packed_name)), inp)
  scale = np.asarray(reader.get(scale_name), np.float32)
  return np.asarray(_int4_dequantize(jnp.asarray(q), jnp.asarray(scale), group, 1))


__all__ = ["is_linear", "module_of", "fp8_quantization_config", "fp8_tensors", "fp8_weight",
           "int4_quantization_config", "pack_int32", "unpack_int32", "int4_tensors", "int4_names",
           "int4_weight"]
