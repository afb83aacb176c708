"""Blockwise attention (joyjax/model/blockwise.py) equals plain masked softmax attention, forward and all
gradients, over packed documents, ragged lengths, unequal query / key blocks and bf16; and the model with
``model.attention_impl=blockwise`` gives the einsum path's logits and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import dot_operand_dtypes, tiny_config
from joyjax import model
from joyjax.model.blockwise import blockwise_attention


def reference(q, k, v, seg, scale):
  """float64 numpy: causal within segments."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  seg = np.asarray(seg)
  s = q.shape[1]
  scores = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
  mask = np.tril(np.ones((s, s), bool))[None] & (seg[:, :, None] == seg[:, None, :])
  scores = np.where(mask[:, None], scores, -np.inf)
  p = np.exp(scores - scores.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("bhqk,bkhd->bqhd", p, v)


def reference_jax(q, k, v, seg, scale):
  s = q.shape[1]
  scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
  mask = jnp.tril(jnp.ones((s, s), bool))[None] & (seg[:, :, None] == seg[:, None, :])
  p = jax.nn.softmax(jnp.where(mask[:, None], scores, -1e30), axis=-1)
  return jnp.einsum("bhqk,bkhd->bqhd", p, v.astype(jnp.float32))


def problem(s, dtype=jnp.float32, b=2, h=3, dk=12, dv=8, seed=0):
  rng = np.random.default_rng(seed)
  q, k = (jnp.asarray(rng.normal(size=(b, s, h, dk)), dtype) for _ in range(2))
  v = jnp.asarray(rng.normal(size=(b, s, h, dv)), dtype)
  # Row 0: three documents (cuts not on block edges); row 1: one document.
  seg = np.ones((b, s), np.int32)
  seg[0, s // 3:] = 2
  seg[0, (2 * s) // 3 + 1:] = 3
  return q, k, v, jnp.asarray(seg)


CASES = {  # name: (seq, block_q, block_k)
    "ragged_50": (50, 16, 16),
    "bq16_bk8": (48, 16, 8),
    "bq8_bk32": (40, 8, 32),
    "one_block": (24, 512, 512),
}


@pytest.mark.parametrize("name", list(CASES))
def test_forward_and_gradients_match_reference(name):
  s, bq, bk = CASES[name]
  q, k, v, seg = problem(s)
  scale = 0.3
  out = blockwise_attention(q, k, v, seg, scale=scale, block_q=bq, block_k=bk)
  assert out.shape == (2, s, 3, 8) and out.dtype == jnp.float32
  np.testing.assert_allclose(out, reference(q, k, v, seg, scale), atol=2e-6, rtol=1e-5)

  cot = jax.random.normal(jax.random.key(1), out.shape, jnp.float32)
  f = lambda *a: jnp.sum(blockwise_attention(*a, seg, scale=scale, block_q=bq, block_k=bk) * cot)
  g = lambda *a: jnp.sum(reference_jax(*a, seg, scale) * cot)
  got = jax.grad(f, argnums=(0, 1, 2))(q, k, v)
  want = jax.grad(g, argnums=(0, 1, 2))(q, k, v)
  for name_, a, b in zip("qkv", got, want):
    assert a.shape == b.shape and a.dtype == b.dtype
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4, err_msg=f"d{name_}")
    assert float(jnp.abs(b).max()) > 0.1


def test_first_token_of_each_document_attends_only_to_itself():
  q, k, v, seg = problem(30)
  out = blockwise_attention(q, k, v, seg, scale=0.5, block_q=8, block_k=8)
  for start in (0, 10, 21):  # row 0's documents start at 0, s // 3, 2 s // 3 + 1
    np.testing.assert_allclose(out[0, start], v[0, start], atol=1e-6)


def test_bfloat16_inputs():
  q, k, v, seg = problem(40, jnp.bfloat16)
  out = blockwise_attention(q, k, v, seg, scale=0.3, block_q=16, block_k=8)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), reference(q, k, v, seg, 0.3), atol=3e-2, rtol=3e-2)


def test_bfloat16_backward_matmuls_take_bfloat16_operands():
  """The backward's four matmuls per block pair (dV, dP, dK, dQ) take bf16 operands and accumulate in float32
  (they took float32 ones: off the tensor-core / MXU path); the bf16 gradients stay within bf16 rounding of the
  float32 reference's."""
  q, k, v, seg = problem(40, jnp.bfloat16)
  cot = jax.random.normal(jax.random.key(2), (2, 40, 3, 8), jnp.float32)
  f = lambda *a: jnp.sum(blockwise_attention(*a, seg, scale=0.3, block_q=16, block_k=8).astype(jnp.float32)  # noqa: E731
                         * cot)
  jaxpr = jax.make_jaxpr(jax.grad(f, argnums=(0, 1, 2)))(q, k, v).jaxpr
  dots = dot_operand_dtypes(jaxpr)
  # the forward's scores and P @ V, the backward's recomputed scores and its four matmuls: bf16; and
  # rowsum(dO * O), a reduction over the head width rather than a matmul, in float32
  assert dots.count(("bfloat16", "bfloat16")) == 2 + 5 and dots.count(("float32", "float32")) == 1, dots
  assert len(dots) == 8, dots
  got = jax.grad(f, argnums=(0, 1, 2))(q, k, v)
  g = lambda *a: jnp.sum(reference_jax(*a, seg, 0.3) * cot)  # noqa: E731
  want = jax.grad(g, argnums=(0, 1, 2))(*(a.astype(jnp.float32) for a in (q, k, v)))
  for name, a, b in zip("qkv", got, want):
    scale = float(jnp.abs(b).max())
    np.testing.assert_allclose(np.asarray(a, np.float32), b, atol=3e-2 * scale, rtol=0, err_msg=f"d{name}")


@pytest.mark.slow  # ~16 s on 2 CPU cores; the kernel-level tests above cover the same attention
def test_model_blockwise_equals_einsum_path(monkeypatch):
  """The tiny model in float32: logits and every gradient, attention_impl blockwise (blocks of 8 over 24
  tokens, two packed documents) vs xla."""
  base = ["--config.model.dtype=float32", "--config.model.attention_block=8"]
  cfg_x = tiny_config(base)
  cfg_b = tiny_config(base, "--config.model.attention_impl=blockwise")
  params = model.init(cfg_x, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 24), 0, cfg_x.model.vocab_size)
  seg = jnp.asarray(np.repeat([[1] * 11 + [2] * 13], 2, axis=0), jnp.int32)
  pos = jnp.asarray(np.repeat([list(range(11)) + list(range(13))], 2, axis=0), jnp.int32)

  def loss(cfg):
    def f(p):
      logits = model.forward(cfg, p, tokens, segment_ids=seg, positions=pos)
      return jnp.sum(jax.nn.log_softmax(logits)[..., 0]), logits
    return jax.jit(jax.value_and_grad(f, has_aux=True))(params)

  from joyjax.model import attention
  calls = []
  real = attention.blockwise_attention
  monkeypatch.setattr(attention, "blockwise_attention", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
  (_, lx), gx = loss(cfg_x)
  assert calls == []
  (_, lb), gb = loss(cfg_b)
  assert calls and all(kw["block_q"] == kw["block_k"] == 8 for kw in calls)  # every layer's attention
  np.testing.assert_allclose(lb, lx, atol=2e-5, rtol=1e-5)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(gb)[0], jax.tree.leaves(gx)):
    scale = float(jnp.abs(b).max())
    assert float(jnp.abs(a - b).max()) <= 1e-4 * max(scale, 1e-6), jax.tree_util.keystr(path)
