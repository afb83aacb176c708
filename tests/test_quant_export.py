"""Quantized export (FP8 block-scaled as DeepSeek-V3 ships; compressed-tensors packed INT4) and import back.

Exactness: what the importer reads back equals quant's dequantize(quantize(w)) of the exported weights, bit for
bit, and the INT4 export equals what QAT simulates. Closeness to the unquantized model (FP8), with the tolerance
derived from e4m3's rounding: 3 mantissa bits, so a weight's relative rounding error is uniform within half a
spacing of 2^-3..2^-4 of its magnitude, an RMS of at most 2^-4 / sqrt(3) = 3.6% (1.8% to 3.6% across a binade;
measured on the tiny model's weights: 2.6%). Errors of independent weights average out in each matrix product,
so a logit moves by about that fraction of its size: the relative RMS logit error is asserted below 3 x 3.6%
(measured: 3.6% on the test's tokens, 4.8% on others). A token whose router picks another expert under the
perturbation jumps further (the largest single-logit error measured: 11%, 18% on other tokens, of the largest
logit), so max-abs is bounded at 30% of the largest logit.
"""

import json
import os

import jax
import ml_dtypes
import numpy as np
import pytest

from conftest import rewrite_checkpoint, tiny_config
from joyjax import model, quant
from joyjax.convert import hf, quantized
from joyjax.convert.safetensors_io import SafetensorsReader
from joyjax.errors import CheckpointError

E4M3_RMS_REL = 2.0 ** -4 / np.sqrt(3)  # RMS relative rounding error of e4m3 at the widest spacing
RMS_LOGIT_TOL = 3 * E4M3_RMS_REL       # relative RMS logit error allowed (see the module docstring)
MAX_LOGIT_TOL = 0.30                   # max |logit error| / max |logit|: routing flips included
GROUP = 32                             # divides every tiny-model input dimension (32, 64, 128)
LINEAR_RE = r"(self_attn\.(q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)|mlp\.(gate|up|down)_proj|" \
            r"mlp\.shared_experts\.(gate|up|down)_proj|mlp\.experts\.\d+\.(gate|up|down)_proj)"


@pytest.fixture(scope="module")
def tiny():
  """The tiny model's config and random params (one init for the module: it is the slow part)."""
  cfg = tiny_config()
  return cfg, jax.tree.map(np.asarray, model.init(cfg, jax.random.key(0)))


@pytest.fixture(scope="module")
def fp8(tiny, tmp_path_factory):
  cfg, params = tiny
  out = tmp_path_factory.mktemp("fp8") / "hf"
  hf.export_checkpoint(cfg, params, str(out), dtype="float32", quantize="fp8")
  return cfg, params, out


def _logits(cfg, params, tokens):
  return np.asarray(jax.jit(lambda p, t: model.forward(cfg, p, t))(params, tokens))


def _tokens(cfg, shape=(4, 64)):
  return np.random.default_rng(1).integers(0, cfg.model.vocab_size, size=shape)


def _assert_close_to_unquantized(got, want):
  err = got - want
  rms = np.sqrt((err ** 2).mean() / (want ** 2).mean())
  assert rms < RMS_LOGIT_TOL, f"relative RMS logit error {rms:.4f} >= {RMS_LOGIT_TOL:.4f}"
  mx = np.abs(err).max() / np.abs(want).max()
  assert mx < MAX_LOGIT_TOL, f"max-abs logit error {mx:.4f} of the largest logit >= {MAX_LOGIT_TOL}"
  assert rms > 1e-4, "the quantized model equals the float one: nothing was quantized"


# ------------------------------------------------------------------------------------------------ FP8


def test_fp8_inventory(fp8):
  """Decoder linears (incl. the MTP block's) are float8_e4m3fn with float32 [ceil(out/128), ceil(in/128)] scales;
  embeddings, heads, norms, the router and eh_proj are not; config.json says how."""
  import re
  cfg, _, out = fp8
  r = SafetensorsReader(str(out))
  quantized_names = {k for k in r.keys() if str(r.get(k).dtype) == "float8_e4m3fn"}
  want = {k for k in r.keys() if re.fullmatch(rf"model\.layers\.\d+\.{LINEAR_RE}\.weight", k)}
  assert quantized_names == want
  layers = cfg.model.num_layers + cfg.model.mtp.num_layers
  per_moe_layer = 5 + 3 * cfg.model.moe.num_experts + 3  # attention, routed, shared
  assert len(want) == 8 + (layers - 1) * per_moe_layer
  for k in want:
    s = r.get(k + "_scale_inv")
    assert s.dtype == np.float32 and s.shape == tuple(-(-n // 128) for n in r.shape(k)), k
  scales = {k for k in r.keys() if k.endswith("_scale_inv")}
  assert scales == {k + "_scale_inv" for k in want}
  for k in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.1.mlp.gate.weight",
            "model.layers.3.eh_proj.weight", "model.layers.1.self_attn.kv_a_layernorm.weight"):
    assert r.get(k).dtype == np.float32, k
  assert r.get("model.layers.1.mlp.gate.e_score_correction_bias").dtype == np.float32
  c = json.loads((out / "config.json").read_text())
  assert c["quantization_config"] == {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                      "weight_block_size": [128, 128]}


def test_fp8_reimport_exact_and_close(fp8):
  """Reimported params: each quantized weight equals quant.fp8_block_dequantize of the stored FP8 + scales
  (bit for bit, after the layout change), which is QAT's FP8 simulation of every group; the rest equal the
  originals. Logits within the stated tolerance of the unquantized model."""
  cfg, params, out = fp8
  cfg2, back = hf.import_checkpoint(str(out))
  r = SafetensorsReader(str(out))
  name = "model.layers.1.self_attn.q_b_proj.weight"
  want = np.asarray(quant.fp8_block_dequantize(np.array(r.get(name)), np.array(r.get(name + "_scale_inv"))))
  np.testing.assert_array_equal(back["moe_layers"]["attn"]["q_b"][0].reshape(want.shape[1], -1), want.T)
  qat = jax.jit(lambda p: quant.fake_quantize_params(_with(cfg, "fp8"), p))(params)
  for (path, a), b, c in zip(jax.tree_util.tree_leaves_with_path(back), jax.tree.leaves(qat), jax.tree.leaves(params)):
    # what QAT trains against (its straight-through forward value) is what the checkpoint holds, bit for bit
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
  tokens = _tokens(cfg)
  _assert_close_to_unquantized(_logits(cfg2, back, tokens), _logits(cfg, params, tokens))


def _with(cfg, fmt, targets="attention,dense,shared,routed"):
  c = tiny_config(f"--config.quant.format={fmt}", f"--config.quant.group_size={GROUP}",
                  f"--config.quant.targets={targets}")
  assert c.model == cfg.model
  return c


def test_fp8_ragged_blocks_unit():
  """A [300, 200] weight spans 3 x 2 blocks with ragged edges: scales are per block amax / 448, the stored values
  round-trip, and every element lies within half an e4m3 spacing of the original."""
  rng = np.random.default_rng(0)
  w = rng.normal(size=(300, 200)).astype(np.float32)
  w[256:, 128:] *= 100.0  # the ragged corner block gets its own, larger scale
  (n1, q), (n2, s) = quantized.fp8_tensors("x.weight", w)
  assert (n1, n2) == ("x.weight", "x.weight_scale_inv")
  assert q.dtype == ml_dtypes.float8_e4m3fn and s.shape == (3, 2) and s.dtype == np.float32
  for i in range(3):
    for j in range(2):
      blk = w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128]
      np.testing.assert_allclose(s[i, j], np.abs(blk).max() / 448.0, rtol=1e-6)
  back = quantized.fp8_weight("x.weight", q, s)
  scale = np.repeat(np.repeat(s, 128, 0), 128, 1)[:300, :200]
  np.testing.assert_array_equal(back, q.astype(np.float32) * scale)
  assert np.all(np.abs(back - w) <= 2.0 ** -4 * np.abs(w) + 2.0 ** -9 * scale)  # normals; subnormal floor
  with pytest.raises(CheckpointError, match=r"x\.weight_scale_inv has shape \(2, 2\), expected \(3, 2\)"):
    quantized.fp8_weight("x.weight", q, s[:2])


def test_corrupt_scales_are_one_line_checkpoint_errors(fp8, tmp_path):
  from joyjax.cli import error_line
  _, _, out = fp8
  name = "model.layers.1.mlp.experts.2.down_proj.weight_scale_inv"
  rewrite_checkpoint(out, tmp_path / "c", lambda t: dict(t, **{name: np.ones((2, 1), np.float32)}))
  with pytest.raises(CheckpointError, match=r"experts\.2\.down_proj\.weight_scale_inv has shape \(2, 1\), "
                                            r"expected \(1, 1\)") as e:
    hf.import_checkpoint(str(tmp_path / "c"))
  assert "\n" not in error_line("convert", e.value)


@pytest.mark.slow
def test_fp8_export_loads_in_transformers(fp8):
  """transformers' FineGrainedFP8 loader (no GPU: it dequantizes) reads the export: its logits equal the
  reimported joyjax model's (same dequantized weights) and are within the stated tolerance of the unquantized."""
  pytest.importorskip("accelerate", reason="transformers' FP8 loader needs accelerate")
  from transformers import AutoModelForCausalLM
  from hf_reference import hf_logits
  cfg, params, out = fp8
  ref = AutoModelForCausalLM.from_pretrained(str(out), attn_implementation="eager")
  tokens = _tokens(cfg)
  got = hf_logits(ref, tokens)
  cfg2, back = hf.import_checkpoint(str(out))
  np.testing.assert_allclose(got, _logits(cfg2, back, tokens), atol=1e-4, rtol=0)
  _assert_close_to_unquantized(got, _logits(cfg, params, tokens))


# ------------------------------------------------------------------------------------------------ INT4


def test_int32_packing_matches_compressed_tensors():
  """compressed-tensors' pack_to_int32: q + 8 as unsigned nibbles, element k of each 8 at bits 4k; rows padded."""
  q = np.array([[1, 2, -8, 7, 0, -1, 3, -3, 5], [-8] * 9], np.int8)
  p = quantized.pack_int32(q)
  assert p.dtype == np.int32 and p.shape == (2, 2)
  want0 = sum((int(v) + 8) << (4 * k) for k, v in enumerate(q[0, :8]))
  assert p[0, 0] == np.array(want0, np.uint32).view(np.int32)
  assert p[0, 1] == 5 + 8 and p[1, 0] == 0  # one padded element; all -8 -> all-zero nibbles
  # the docstring example of pack_to_int32 for 8 bits, [1, 2] -> 33409, has its 4-bit analogue: [1, 2] -> 0xA9
  assert quantized.pack_int32(np.array([[1, 2]], np.int8))[0, 0] == (9 | 10 << 4)
  np.testing.assert_array_equal(quantized.unpack_int32(p, 9), q)
  big = np.random.default_rng(0).integers(-8, 8, size=(5, 67)).astype(np.int8)
  np.testing.assert_array_equal(quantized.unpack_int32(quantized.pack_int32(big), 67), big)


def test_int4_export_equals_qat(tiny, tmp_path):
  """INT4 export of quant.targets -> import gives exactly QAT's int4 weights (quantize_dequantize of the matrix
  view, and fake_quantize_params' forward value, bit for bit); everything else is unchanged; the tensor
  inventory and config.json follow compressed-tensors' pack-quantized layout."""
  cfg = _with(tiny[0], "int4", targets="attention,routed")
  params = tiny[1]
  out = tmp_path / "int4"
  hf.export_checkpoint(cfg, params, str(out), dtype="float32", quantize="int4")
  r = SafetensorsReader(str(out))
  packed = sorted(k for k in r.keys() if k.endswith(".weight_packed"))
  assert packed and all(".self_attn." in k or ".mlp.experts." in k for k in packed)
  assert not any(k.endswith("_scale_inv") for k in r.keys())
  k = "model.layers.1.mlp.experts.5.down_proj"
  assert r.get(f"{k}.weight_packed").dtype == np.int32 and r.shape(f"{k}.weight_packed") == (64, 4)
  assert r.shape(f"{k}.weight_scale") == (64, 32 // GROUP) and r.get(f"{k}.weight_scale").dtype == np.float32
  np.testing.assert_array_equal(r.get(f"{k}.weight_shape"), [64, 32])
  assert f"{k}.weight" not in r and "model.layers.1.mlp.shared_experts.up_proj.weight" in r
  qc = json.loads((out / "config.json").read_text())["quantization_config"]
  assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
  w = qc["config_groups"]["group_0"]["weights"]
  assert (w["num_bits"], w["symmetric"], w["strategy"], w["group_size"], w["type"]) == (4, True, "group", GROUP, "int")
  assert {"lm_head", "model.layers.1.mlp.gate", "model.layers.1.mlp.shared_experts.up_proj",
          "model.layers.0.mlp.down_proj", "model.layers.3.eh_proj"} <= set(qc["ignore"])
  assert not set(qc["ignore"]) & {p[:-len(".weight_packed")] for p in packed}

  _, back = hf.import_checkpoint(str(out))
  info = model.param_info(cfg)
  def qat(i, w):
    if not quant.is_quantized(cfg, i):
      return w
    f = jax.jit(lambda m: quant.quantize_dequantize(m, "int4", GROUP, -2))
    return np.asarray(f(w.reshape(quant.matrix_shape(i, w.shape)))).reshape(w.shape)

  want = jax.tree.map(qat, info, params, is_leaf=model.is_info)
  n_changed = 0
  for (path, a), b, c in zip(jax.tree_util.tree_leaves_with_path(back), jax.tree.leaves(want), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
    n_changed += not np.array_equal(a, c)
  assert n_changed == 3 * 5 + 2 * 3, n_changed  # 5 MLA matrices in 3 stacks (dense, MoE, MTP); 3 routed in 2
  fq = jax.jit(lambda p: quant.fake_quantize_params(cfg, p))(params)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(fq)):
    np.testing.assert_array_equal(a, b)


def test_int4_bad_group_size_and_corrupt_scale(tiny, tmp_path):
  from joyjax.errors import ConfigError
  cfg = tiny_config("--config.quant.group_size=48", "--config.quant.targets=routed")
  params = tiny[1]
  with pytest.raises(ConfigError, match="quant.group_size=48"):
    hf.export_checkpoint(cfg, params, str(tmp_path / "bad"), quantize="int4")
  cfg = tiny_config(f"--config.quant.group_size={GROUP}", "--config.quant.targets=routed")
  hf.export_checkpoint(cfg, params, str(tmp_path / "ok"), dtype="float32", quantize="int4")
  name = "model.layers.2.mlp.experts.0.up_proj.weight_scale"
  rewrite_checkpoint(tmp_path / "ok", tmp_path / "c", lambda t: dict(t, **{name: np.ones((32, 3), np.float32)}))
  with pytest.raises(CheckpointError, match=r"experts\.0\.up_proj\.weight_scale has shape \(32, 3\)"):
    hf.import_checkpoint(str(tmp_path / "c"))


def test_convert_command_quantize(fp8, tmp_path):
  """joyjax convert --quantize fp8 / int4 from a params checkpoint, then --hf-dir reads each back."""
  from joyjax.cli import main
  _, _, out = fp8
  main(["convert", "--hf-dir", str(out), "--out", str(tmp_path / "ckpt")])  # imports the FP8 checkpoint
  base = ["convert", "--params", str(tmp_path / "ckpt"), "--config", "configs/tiny.py", "--dtype", "float32"]
  main(base + ["--out", str(tmp_path / "fp8"), "--quantize", "fp8"])
  r = SafetensorsReader(str(tmp_path / "fp8"))
  assert r.get("model.layers.0.mlp.gate_proj.weight").dtype == ml_dtypes.float8_e4m3fn
  main(base + ["--out", str(tmp_path / "int4"), "--quantize", "int4", f"--config.quant.group_size={GROUP}"])
  assert "model.layers.0.mlp.gate_proj.weight_packed" in SafetensorsReader(str(tmp_path / "int4"))
  main(["convert", "--hf-dir", str(tmp_path / "int4"), "--out", str(tmp_path / "back")])
