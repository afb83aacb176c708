"""Model behaviour: cached decoding, packed sequences, MTP causality, scan/remat equivalence, param counts."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_repo_config, tiny_config
from joyjax import model
from joyjax.model import count_params


@pytest.fixture(scope="module")
def tiny():
  cfg = tiny_config()
  return cfg, model.init(cfg, jax.random.key(0))


def test_cached_decoding_equals_full_forward(tiny):
  """Prefill a prompt, then generate 20 tokens greedily one at a time from the latent cache; every step's
  logits equal the full forward pass over the final sequence."""
  cfg, params = tiny
  b, prompt_len, steps = 2, 5, 20
  tokens = np.random.default_rng(0).integers(0, cfg.model.vocab_size, (b, prompt_len))
  step = jax.jit(lambda p, t, c: model.decode_step(cfg, p, t, c))
  cache = model.init_cache(cfg, b, prompt_len + steps)
  logits, cache = step(params, tokens, cache)
  outs = [logits]
  seq = tokens
  for _ in range(steps):
    nxt = jnp.argmax(outs[-1][:, -1], axis=-1)[:, None]
    seq = np.concatenate([seq, np.asarray(nxt)], axis=1)
    logits, cache = step(params, nxt, cache)
    outs.append(logits)
  cached = np.concatenate([np.asarray(o) for o in outs], axis=1)[:, :-1]
  full = np.asarray(jax.jit(lambda p, t: model.forward(cfg, p, t))(params, seq[:, :-1]))
  np.testing.assert_array_equal(cache["index"], [prompt_len + steps] * b)  # per row
  np.testing.assert_allclose(cached, full, atol=1e-4, rtol=0)
  # the cache holds the compressed latent, not expanded per-head keys and values
  a = cfg.model.attention
  assert cache["moe_layers"]["c"].shape[-1] == a.kv_lora_rank
  assert cache["moe_layers"]["k_rope"].shape[-1] == a.qk_rope_head_dim


def test_packed_documents_do_not_attend_across(tiny):
  """Two documents packed in one row with segment ids and restarted positions give exactly the logits of each
  document run alone."""
  cfg, params = tiny
  rng = np.random.default_rng(1)
  a, b = rng.integers(0, cfg.model.vocab_size, (1, 7)), rng.integers(0, cfg.model.vocab_size, (1, 9))
  packed = np.concatenate([a, b], axis=1)
  seg = np.array([[1] * 7 + [2] * 9])
  pos = np.array([list(range(7)) + list(range(9))])
  fwd = jax.jit(lambda p, t, s, q: model.forward(cfg, p, t, segment_ids=s, positions=q))
  got = np.asarray(fwd(params, packed, seg, pos))
  alone_a = np.asarray(jax.jit(lambda p, t: model.forward(cfg, p, t))(params, a))
  alone_b = np.asarray(jax.jit(lambda p, t: model.forward(cfg, p, t))(params, b))
  np.testing.assert_allclose(got[:, :7], alone_a, atol=1e-5)
  np.testing.assert_allclose(got[:, 7:], alone_b, atol=1e-5)


def test_mtp_is_causal_and_uses_next_token(tiny):
  """MTP position i sees tokens <= i + 1 (it predicts i + 2): changing token i + 2 leaves it unchanged,
  changing token i + 1 changes it."""
  cfg, params = tiny
  tokens = np.random.default_rng(2).integers(0, cfg.model.vocab_size, (1, 12))
  fwd = jax.jit(lambda p, t: model.forward(cfg, p, t, return_mtp=True)[1][0])
  base = np.asarray(fwd(params, tokens))
  later = tokens.copy()
  later[0, 8] = (later[0, 8] + 1) % cfg.model.vocab_size
  changed = np.asarray(fwd(params, later))
  np.testing.assert_allclose(changed[:, :6], base[:, :6], atol=1e-6)
  assert np.abs(changed[:, 7] - base[:, 7]).max() > 1e-4


@pytest.mark.parametrize("overrides", [dict(scan_layers=False), dict(remat="full"), dict(remat="dots")])
def test_scan_and_remat_do_not_change_results(tiny, overrides):
  cfg, params = tiny
  other = tiny_config({f"model.{k}": v for k, v in overrides.items()})
  tokens = np.random.default_rng(3).integers(0, cfg.model.vocab_size, (2, 10))

  def loss(c):
    return lambda p: jnp.mean(model.forward(c, p, tokens) ** 2)

  l0, g0 = jax.jit(jax.value_and_grad(loss(cfg)))(params)
  l1, g1 = jax.jit(jax.value_and_grad(loss(other)))(params)
  np.testing.assert_allclose(l0, l1, rtol=1e-6)
  for x, y in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(x, y, atol=1e-6)


def test_bf16_compute_is_close_to_float32(tiny):
  cfg, params = tiny
  bf = tiny_config("--config.model.dtype=bfloat16")
  tokens = np.random.default_rng(4).integers(0, cfg.model.vocab_size, (2, 10))
  ref = jax.nn.log_softmax(model.forward(cfg, params, tokens))
  got = model.forward(bf, params, tokens)
  assert got.dtype == jnp.float32
  assert float(jnp.mean(jnp.abs(jax.nn.log_softmax(got) - ref))) < 0.05


def test_every_param_has_logical_axes(tiny):
  cfg, params = tiny
  axes = model.logical_axes(cfg)
  flat_p = jax.tree_util.tree_leaves_with_path(params)
  flat_a = dict(jax.tree_util.tree_leaves_with_path(axes, is_leaf=lambda x: isinstance(x, tuple)))
  for path, leaf in flat_p:
    assert path in flat_a, path
    assert len(flat_a[path]) == leaf.ndim, (path, flat_a[path], leaf.shape)


def test_joyai_flash_parameter_count_by_hand():
  """The published shapes: 48B total, ~3B activated. Derived here from the architecture, longhand."""
  cfg = load_repo_config("joyai_flash")
  H, V, L, dense_w = 2048, 129280, 40, 7168
  heads, q_lora, kv_lora, nope, rope, v = 32, 1536, 512, 128, 64, 128
  E, k, w, shared = 256, 8, 768, 1
  attn = (H * q_lora + q_lora + q_lora * heads * (nope + rope)          # q_a, its norm, q_b
          + H * (kv_lora + rope) + kv_lora + kv_lora * heads * (nope + v)  # kv_a, its norm, kv_b
          + heads * v * H)                                                 # o
  norms = 2 * H
  dense_mlp = 3 * H * dense_w
  expert = 3 * H * w
  moe_fixed = H * E + shared * expert                                       # router + shared expert
  total = 2 * V * H + H + L * (attn + norms) + 1 * dense_mlp + (L - 1) * (moe_fixed + E * expert)
  activated = total - (L - 1) * (E - k) * expert
  got = count_params(cfg)
  assert got["total"] == total
  assert got["activated"] == activated
  assert got["embeddings"] == 2 * V * H
  assert 47.5e9 < total < 49.5e9          # "48B total"
  assert 2.5e9 < activated - 2 * V * H < 3.5e9  # "~3B activated" (2.7B without embeddings)
  mtp = 2 * H + 2 * H * H + attn + norms + moe_fixed + E * expert + H
  assert got["mtp_total"] == mtp
  print(f"joyai_flash: total {total:,} activated {activated:,} (no embeddings {activated - 2 * V * H:,})")


def test_params_command_prints_counts(capsys):
  from joyjax.cli import main
  main(["params", "--config", "configs/joyai_flash.py"])
  out = capsys.readouterr().out
  assert "48,942,532,608" in out and "3,304,310,784" in out
