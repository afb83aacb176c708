"""Bad checkpoints get errors naming the tensor; FP8 block-quantised checkpoints are dequantised; MTP layers
survive export and import."""

import json
import os
import shutil

import jax
import ml_dtypes
import numpy as np
import pytest

from conftest import rewrite_checkpoint, tiny_config
from joyjax import model
from joyjax.convert import hf
from joyjax.convert.safetensors_io import CheckpointFormatError, SafetensorsReader


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """A joyjax tiny model (with its MTP module) exported to HF format, float32."""
  cfg = tiny_config("--config.model.num_layers=2")
  params = jax.tree.map(np.asarray, model.init(cfg, jax.random.key(0)))
  params["moe_layers"]["mlp"]["router_bias"] = np.linspace(-0.2, 0.2, 8, dtype=np.float32)[None]
  out = tmp_path_factory.mktemp("export") / "hf"
  hf.export_checkpoint(cfg, params, str(out), dtype="float32")
  return cfg, params, out


def test_mtp_round_trip(exported):
  cfg, params, out = exported
  cfg2, params2 = hf.import_checkpoint(str(out))
  assert cfg2.model.mtp.num_layers == 1
  flat1, flat2 = jax.tree_util.tree_leaves_with_path(params), dict(jax.tree_util.tree_leaves_with_path(params2))
  for path, leaf in flat1:
    np.testing.assert_array_equal(leaf, flat2[path], err_msg=str(path))
  tokens = np.arange(12)[None] % cfg.model.vocab_size
  _, mtp1 = model.forward(cfg, params, tokens, return_mtp=True)
  _, mtp2 = model.forward(cfg2, params2, tokens, return_mtp=True)
  np.testing.assert_allclose(mtp1[0], mtp2[0], atol=1e-6)


def test_missing_tensor_is_named(exported, tmp_path):
  _, _, out = exported
  name = "model.layers.1.self_attn.kv_b_proj.weight"
  rewrite_checkpoint(out, tmp_path / "c", lambda t: {k: v for k, v in t.items() if k != name})
  with pytest.raises(hf.ConversionError, match="missing 1 tensor.*kv_b_proj"):
    hf.import_checkpoint(str(tmp_path / "c"))


def test_wrong_shape_is_named(exported, tmp_path):
  _, _, out = exported
  name = "model.layers.1.mlp.experts.3.up_proj.weight"
  rewrite_checkpoint(out, tmp_path / "c", lambda t: dict(t, **{name: t[name][:-1]}))
  with pytest.raises(hf.ConversionError, match=r"experts\.3\.up_proj.*shape \(31, 64\), expected \(32, 64\)"):
    hf.import_checkpoint(str(tmp_path / "c"))


def test_unexpected_tensor_is_named(exported, tmp_path):
  _, _, out = exported
  rewrite_checkpoint(out, tmp_path / "c", lambda t: dict(t, **{"model.layers.1.mlp.experts.8.up_proj.weight":
                                                               np.zeros((32, 64), np.float32)}))
  with pytest.raises(hf.ConversionError, match=r"does not know.*experts\.8\.up_proj"):
    hf.import_checkpoint(str(tmp_path / "c"))


def test_truncated_file_and_wrong_model_type(exported, tmp_path):
  _, _, out = exported
  shutil.copytree(out, tmp_path / "t")
  f = tmp_path / "t" / "model.safetensors"
  f.write_bytes(f.read_bytes()[:-100])
  with pytest.raises(CheckpointFormatError, match="truncated"):
    hf.import_checkpoint(str(tmp_path / "t"))
  shutil.copytree(out, tmp_path / "m")
  c = json.loads((tmp_path / "m" / "config.json").read_text())
  (tmp_path / "m" / "config.json").write_text(json.dumps(dict(c, model_type="llama")))
  with pytest.raises(hf.ConversionError, match="model_type is 'llama'"):
    hf.import_checkpoint(str(tmp_path / "m"))


def _quantize_fp8(w, block=128):
  """Per-128x128-block absmax scaling into float8_e4m3fn, as DeepSeek-V3 FP8 checkpoints store weights."""
  out, inp = w.shape
  sb = np.zeros((-(-out // block), -(-inp // block)), np.float32)
  q = np.zeros(w.shape, ml_dtypes.float8_e4m3fn)
  for i in range(sb.shape[0]):
    for j in range(sb.shape[1]):
      blk = w[i * block:(i + 1) * block, j * block:(j + 1) * block]
      sb[i, j] = max(np.abs(blk).max(), 1e-12) / 448.0
      q[i * block:(i + 1) * block, j * block:(j + 1) * block] = (blk / sb[i, j]).astype(ml_dtypes.float8_e4m3fn)
  return q, sb


def test_fp8_block_quantized_checkpoint(exported, tmp_path):
  """Matrices stored as FP8 + weight_scale_inv import as q * scale per 128x128 block (checked element-wise
  against a direct computation), and the dequantised model is close to the original."""
  cfg, params, out = exported
  name = "model.layers.1.mlp.experts.0.gate_proj.weight"
  big = "lm_head.weight"  # [4096, 64]: 32 blocks down the rows, exercising the block indexing

  def edit(t):
    t = dict(t)
    for k in [k for k in t if k.endswith("proj.weight") or k == big]:
      q, s = _quantize_fp8(t[k])
      t[k] = q
      t[k[:-len("weight")] + "weight_scale_inv"] = s
    return t

  rewrite_checkpoint(out, tmp_path / "fp8", edit)
  cfg2, params2 = hf.import_checkpoint(str(tmp_path / "fp8"))
  reader = SafetensorsReader(str(tmp_path / "fp8"))
  q, s = np.array(reader.get(big)), np.array(reader.get("lm_head.weight_scale_inv"))
  want = np.stack([q[r].astype(np.float32) * s[r // 128] for r in range(q.shape[0])])  # [4096, 64]
  np.testing.assert_array_equal(params2["lm_head"]["kernel"], want.T)
  q, s = np.array(reader.get(name)), np.array(reader.get(name + "_scale_inv"))
  np.testing.assert_array_equal(params2["moe_layers"]["mlp"]["wi_gate"][0, 0], (q.astype(np.float32) * s[0, 0]).T)
  rel = np.abs(params2["moe_layers"]["mlp"]["wi_gate"] - params["moe_layers"]["mlp"]["wi_gate"]).max()
  assert rel < 0.1 * np.abs(params["moe_layers"]["mlp"]["wi_gate"]).max()
  # a quantised weight without its scales is an error naming it
  rewrite_checkpoint(tmp_path / "fp8", tmp_path / "noscale", lambda t: {k: v for k, v in t.items()
                                                                         if k != name + "_scale_inv"})
  with pytest.raises(hf.ConversionError, match=r"experts\.0\.gate_proj\.weight.*FP8.*weight_scale_inv"):
    hf.import_checkpoint(str(tmp_path / "noscale"))


def test_convert_command_round_trip(exported, tmp_path):
  from joyjax.cli import main
  _, params, out = exported
  main(["convert", "--hf-dir", str(out), "--out", str(tmp_path / "ckpt")])
  main(["convert", "--params", str(tmp_path / "ckpt"), "--config", "configs/tiny.py", "--config.model.num_layers=2",
        "--out", str(tmp_path / "hf2"), "--dtype", "float32"])
  _, params2 = hf.import_checkpoint(str(tmp_path / "hf2"))
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
    np.testing.assert_array_equal(a, b)


def test_import_streams_tensor_by_tensor(tmp_path):
  """Host memory during import: the output params plus about one tensor, never the checkpoint twice.

  numpy allocations are traced by tracemalloc; the reader memory-maps the files, so a float32 tensor is
  copied once, into its place in the output. A config with many small tensors (small vocab, 24 layers) makes
  the bound telling: output + 2 largest tensors + 1 MiB (Python objects of tracing the model's abstract
  shapes) is well under 1.5 times the output."""
  import tracemalloc
  cfg = tiny_config("--config.model.num_layers=24", "--config.model.vocab_size=128")
  params = jax.tree.map(np.asarray, model.init(cfg, jax.random.key(0)))
  hf.export_checkpoint(cfg, params, str(tmp_path / "hf"), dtype="float32")
  out_bytes = sum(a.nbytes for a in jax.tree.leaves(params))
  reader = SafetensorsReader(str(tmp_path / "hf"))
  largest = max(int(np.prod(reader.shape(k))) * 4 for k in reader.keys())
  bound = out_bytes + 2 * largest + (1 << 20)
  assert bound < 1.5 * out_bytes, (bound, out_bytes)   # the check below can tell streaming from a full copy
  del params
  hf.import_checkpoint(str(tmp_path / "hf"))  # once untraced: JAX's tracing caches (abstract shapes) fill up
  tracemalloc.start()
  try:
    _, got = hf.import_checkpoint(str(tmp_path / "hf"))
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  assert sum(a.nbytes for a in jax.tree.leaves(got)) == out_bytes
  assert peak <= bound, f"import peaked at {peak / 2**20:.2f} MiB; output {out_bytes / 2**20:.2f} MiB, " \
                        f"largest tensor {largest / 2**20:.2f} MiB"
