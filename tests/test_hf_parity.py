"""Logits parity with transformers' DeepseekV3ForCausalLM after import, and after export + reload."""

import numpy as np
import pytest

import jax
from joyjax import model
from joyjax.convert import hf

from hf_reference import hf_logits, make_hf_model

CASES = {
    "grouped_routing": dict(n_group=4, topk_group=2, n_routed_experts=8, num_experts_per_tok=3),
    "yarn": dict(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                  "original_max_position_embeddings": 32, "beta_fast": 32, "beta_slow": 1,
                                  "mscale": 1.0, "mscale_all_dim": 1.0}, max_position_embeddings=128),
    "first_k_dense_2": dict(first_k_dense_replace=2, num_hidden_layers=3),
    "no_q_lora_not_interleaved": dict(q_lora_rank=None, rope_interleave=False, n_shared_experts=2),
}


def _tokens(seed, vocab, shape=(2, 24)):
  return np.random.default_rng(seed).integers(0, vocab, size=shape)


def _joy_logits(cfg, params, tokens):
  return np.asarray(jax.jit(lambda p, t: model.forward(cfg, p, t))(params, tokens))


@pytest.mark.parametrize("case", sorted(CASES))
def test_import_matches_transformers(case, tmp_path):
  ref = make_hf_model(seed=len(case), **CASES[case])
  ref.save_pretrained(tmp_path / "hf")
  cfg, params = hf.import_checkpoint(str(tmp_path / "hf"))
  tokens = _tokens(1, cfg.model.vocab_size)
  want = hf_logits(ref, tokens)
  got = _joy_logits(cfg, params, tokens)
  assert got.shape == want.shape
  assert np.abs(want).max() > 0.1, "reference logits are too small for the tolerance to mean anything"
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_first_k_dense_1_and_export_reload(tmp_path):
  """first_k_dense=1 parity, then export back to HF format and reload in transformers: same logits."""
  from transformers import DeepseekV3ForCausalLM
  ref = make_hf_model(seed=7, first_k_dense_replace=1, n_group=2, topk_group=1)
  ref.save_pretrained(tmp_path / "hf")
  cfg, params = hf.import_checkpoint(str(tmp_path / "hf"))
  assert cfg.model.first_k_dense == 1
  tokens = _tokens(2, cfg.model.vocab_size)
  want = hf_logits(ref, tokens)
  np.testing.assert_allclose(_joy_logits(cfg, params, tokens), want, atol=1e-4, rtol=0)

  hf.export_checkpoint(cfg, params, str(tmp_path / "out"), dtype="float32", max_shard_bytes=20_000)
  assert (tmp_path / "out" / "model.safetensors.index.json").exists(), "small shards force an index"
  back = DeepseekV3ForCausalLM.from_pretrained(str(tmp_path / "out"), attn_implementation="eager")
  np.testing.assert_allclose(hf_logits(back, tokens), want, atol=1e-5, rtol=0)
  cfg2, params2 = hf.import_checkpoint(str(tmp_path / "out"))
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
    np.testing.assert_array_equal(a, b)
