"""losses/head.py against references derived from the math: the chunked cross-entropy against an unchunked
float64 numpy cross-entropy (sums, z-loss, correct count) and the analytic float64 gradient; weight-0 tokens
(even non-finite ones) contribute exact zeros; the undifferentiated path equals the differentiated one; the token
log-probs' hand-written backward at a temperature against autodiff of a full log-softmax; and, with bfloat16
compute, every matmul of the backward pass takes bfloat16 operands (the point of writing it by hand); the chunks
hold every row, so on 8 devices each computes an eighth of the head.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from conftest import dot_operand_dtypes, fsdp_expert_mesh, tiny_config
from joyjax.losses import head


def np_cross_entropy(logits, targets, weights):
  """float64 sums over tokens of w * (log Z - logit[target]), w * (log Z)^2 and w * [argmax == target]; tokens
  of weight 0 are left out (whatever their logits)."""
  logits = np.asarray(logits, np.float64)
  l = logits.reshape(-1, logits.shape[-1])
  t = np.asarray(targets).reshape(-1)
  w = np.asarray(weights, np.float64).reshape(-1)
  live = w != 0
  l, t, w = l[live], t[live], w[live]
  m = l.max(-1)
  lse = m + np.log(np.exp(l - m[:, None]).sum(-1))
  tgt = l[np.arange(len(t)), t]
  return (w * (lse - tgt)).sum(), (w * lse ** 2).sum(), (w * (l.argmax(-1) == t)).sum()


# ------------------------------------------------------------------------------------ chunked cross-entropy

B, S, E, V = 3, 7, 16, 50   # 21 tokens: chunks of 4, 5 and 8 leave a ragged last chunk


def _problem(seed=0):
  rng = np.random.default_rng(seed)
  hidden = rng.normal(size=(B, S, E)).astype(np.float32)
  head_w = (rng.normal(size=(E, V)) / np.sqrt(E) * 3).astype(np.float32)  # logits of a few units
  targets = rng.integers(0, V, (B, S))
  # A third of the tokens predict their own argmax, so the correct count is neither 0 nor everything.
  argmax = (hidden.astype(np.float64) @ head_w.astype(np.float64)).argmax(-1)
  hit = rng.random((B, S)) < 0.35
  targets = np.where(hit, argmax, targets).astype(np.int32)
  weights = rng.choice(np.array([0.0, 1.0, 1.0, 1.0, 0.5, 2.0], np.float32), size=(B, S))
  weights[0, 0] = weights[2, 6] = 0.0   # the first and the last token
  weights[1, 3] = 1.0
  return hidden, head_w, targets, weights


def _sums(hidden, head_w, targets, weights, **kw):
  """(loss, ce, z, correct) of ``head.chunked_cross_entropy`` on numpy inputs."""
  loss, stats = head.chunked_cross_entropy(jnp.asarray(hidden), jnp.asarray(head_w), jnp.asarray(targets),
                                           jnp.asarray(weights), **kw)
  return loss, stats["ce_sum"], stats["z_sum"], stats["correct_sum"]


@pytest.mark.parametrize("chunk", [1, 4, 5, 7, 8, 21, 64])
def test_chunked_sums_equal_full_float64_cross_entropy(chunk):
  hidden, head_w, targets, weights = _problem()
  loss, ce, z, correct = _sums(hidden, head_w, targets, weights, chunk=chunk, z_weight=0.25)
  want = np_cross_entropy(hidden.astype(np.float64) @ head_w.astype(np.float64), targets, weights)
  assert loss.dtype == ce.dtype == z.dtype == correct.dtype == jnp.float32
  np.testing.assert_allclose(float(loss), want[0] + 0.25 * want[1], rtol=2e-6)
  np.testing.assert_allclose(float(ce), want[0], rtol=2e-6)
  np.testing.assert_allclose(float(z), want[1], rtol=2e-6)
  assert 0 < want[2] < weights.sum()
  assert float(correct) == want[2]


def test_weight_zero_tokens_contribute_exactly_nothing_even_when_non_finite():
  hidden, head_w, targets, weights = _problem(1)
  dead = weights == 0
  assert dead.sum() >= 3
  rows = np.argwhere(dead)
  bad = hidden.copy()
  bad[tuple(rows[0])] = np.nan                    # nan logits
  bad[tuple(rows[1])] = np.inf                    # +-inf (and nan) logits
  bad[tuple(rows[2])] = 1e38                      # overflows to inf in the float32 matmul
  for chunk in (3, 21):
    got = _sums(bad, head_w, targets, weights, chunk=chunk, z_weight=0.1)
    clean = _sums(hidden, head_w, targets, weights, chunk=chunk, z_weight=0.1)
    for a, b in zip(got, clean):
      assert np.isfinite(float(a)) and float(a) == float(b)   # bitwise: the dead tokens add exact zeros
  # and all-zero weights give exact zeros
  zero = _sums(bad, head_w, targets, np.zeros((B, S), np.float32), chunk=4, z_weight=0.1)
  assert [float(x) for x in zero] == [0.0] * 4


def _analytic_grads(hidden, head_w, targets, weights, z_weight):
  """float64 gradients of sum w * (lse - logit[t]) + z_weight * sum w * lse^2: d/dlogits = w * (p - onehot) +
  2 z_weight w lse p; then d/dhidden = dlogits @ W^T, d/dW = hidden^T @ dlogits."""
  h = hidden.reshape(-1, E).astype(np.float64)
  w64 = head_w.astype(np.float64)
  logits = h @ w64
  m = logits.max(-1, keepdims=True)
  lse = m + np.log(np.exp(logits - m).sum(-1, keepdims=True))
  p = np.exp(logits - lse)
  onehot = np.eye(V)[targets.reshape(-1)]
  w = weights.reshape(-1, 1).astype(np.float64)
  d = w * (p - onehot) + 2 * z_weight * w * lse * p
  return (d @ w64.T).reshape(hidden.shape), h.T @ d


@pytest.mark.parametrize("chunk", [4, 21])
def test_chunked_gradient_equals_full_reference(chunk):
  hidden, head_w, targets, weights = _problem(2)
  t, w = jnp.asarray(targets), jnp.asarray(weights)

  def chunked(h, hw):
    loss, stats = head.chunked_cross_entropy(h, hw, t, w, chunk=chunk, z_weight=0.1)
    return loss + sum(stats.values())     # the statistics carry no gradient

  def full(h, hw):
    logits = jnp.einsum("bse,ev->bsv", h, hw, precision=jax.lax.Precision.HIGHEST)
    lse = jax.nn.logsumexp(logits, axis=-1)
    tgt = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
    return jnp.sum(w * (lse - tgt)) + 0.1 * jnp.sum(w * lse ** 2)

  args = (jnp.asarray(hidden), jnp.asarray(head_w))
  # A cotangent other than 1 (the train step divides by the batch's token count): the backward scales by it.
  got = jax.jit(jax.grad(lambda h, hw: 2.5 * chunked(h, hw), (0, 1)))(*args)
  ref = jax.jit(jax.grad(lambda h, hw: 2.5 * full(h, hw), (0, 1)))(*args)
  exact = [2.5 * x for x in _analytic_grads(hidden, head_w, targets, weights, 0.1)]
  for g, r, x in zip(got, ref, exact):
    scale = np.abs(x).max()
    assert scale > 0.1
    np.testing.assert_allclose(np.asarray(g), x, rtol=0, atol=1e-5 * scale)
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=0, atol=1e-5 * scale)
  assert not np.any(np.asarray(got[0])[weights == 0])   # no gradient reaches weight-0 tokens


def test_weight_zero_non_finite_tokens_do_not_reach_the_gradient():
  """A nan hidden at a weight-0 token (padding, a masked position) changes no gradient, not even d/dhead_w."""
  hidden, head_w, targets, weights = _problem(1)
  bad = hidden.copy()
  bad[tuple(np.argwhere(weights == 0)[0])] = np.nan
  f = lambda h, hw: head.chunked_cross_entropy(h, hw, jnp.asarray(targets), jnp.asarray(weights), chunk=4,
                                               z_weight=0.1)[0]
  g_bad = jax.grad(f, 1)(jnp.asarray(bad), jnp.asarray(head_w))
  g_clean = jax.grad(f, 1)(jnp.asarray(hidden), jnp.asarray(head_w))
  np.testing.assert_array_equal(np.asarray(g_bad), np.asarray(g_clean))



def test_the_undifferentiated_loss_equals_the_differentiated_one():
  """Evaluation runs the forward alone; training's forward also forms the gradient: the sums agree bit for bit."""
  hidden, head_w, targets, weights = _problem(3)
  args = [jnp.asarray(x) for x in (hidden, head_w, targets, weights)]
  f = lambda h, hw, t, w: head.chunked_cross_entropy(h, hw, t, w, chunk=5, z_weight=0.1)   # noqa: E731
  plain = jax.jit(f)(*args)
  (loss, stats), _ = jax.jit(jax.value_and_grad(f, (0, 1), has_aux=True))(*args)
  assert float(loss) == float(plain[0])
  assert {k: float(v) for k, v in stats.items()} == {k: float(v) for k, v in plain[1].items()}


# ------------------------------------------------------------------------ the backward's matmuls in bfloat16


def _bf16_problem():
  hidden, head_w, targets, weights = _problem(4)
  return jnp.asarray(hidden, jnp.bfloat16), jnp.asarray(head_w), jnp.asarray(targets), jnp.asarray(weights)


def test_cross_entropy_gradient_is_three_bfloat16_matmuls():
  """Autodiff handed the backward a float32 cotangent, so its two matmuls ran with float32 operands; the
  hand-written one rounds d logits to the compute dtype, and forms the gradient in the forward (no recompute)."""
  h, hw, t, w = _bf16_problem()
  f = lambda h, hw: head.chunked_cross_entropy(h, hw, t, w, chunk=5, z_weight=0.1)[0]   # noqa: E731
  dots = dot_operand_dtypes(jax.make_jaxpr(jax.grad(f, (0, 1)))(h, hw).jaxpr)
  assert dots == [("bfloat16", "bfloat16")] * 3
  # and the bf16 gradient is the float32 one to bf16 precision
  got = jax.grad(f, (0, 1))(h, hw)
  want = jax.grad(f, (0, 1))(h.astype(jnp.float32), hw)
  for g, x in zip(got, want):
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(x), rtol=0,
                               atol=2e-2 * float(jnp.abs(x).max()))


def test_token_logps_gradient_is_four_bfloat16_matmuls():
  h, hw, t, w = _bf16_problem()
  f = lambda h, hw: jnp.sum(head.chunked_token_logps(h, hw, t, w != 0, chunk=5, temperature=0.7))  # noqa: E731
  dots = dot_operand_dtypes(jax.make_jaxpr(jax.grad(f, (0, 1)))(h, hw).jaxpr)
  assert dots == [("bfloat16", "bfloat16")] * 4     # forward, its recompute in the backward, d hidden, d head
  got = jax.grad(f, (0, 1))(h, hw)
  want = jax.grad(f, (0, 1))(h.astype(jnp.float32), hw)
  for g, x in zip(got, want):
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(x), rtol=0,
                               atol=2e-2 * float(jnp.abs(x).max()))


# ----------------------------------------------------------------------------------------- token log-probs


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logps_and_their_gradient_equal_a_full_log_softmax(temperature):
  """Values, entropies and gradients (under a non-uniform cotangent) against autodiff of the unchunked
  log-softmax at full precision; a dead token with a nan hidden is exactly 0 and reaches no gradient."""
  hidden, head_w, targets, weights = _problem(5)
  live = weights != 0
  hidden[tuple(np.argwhere(~live)[0])] = np.nan
  coef = jnp.asarray(np.random.default_rng(6).normal(size=(B, S)), jnp.float32)
  t, m = jnp.asarray(targets), jnp.asarray(live)

  def chunked(h, hw):
    lp, ent = head.chunked_token_logps(h, hw, t, m, chunk=4, temperature=temperature, entropy=True)
    return jnp.sum(lp * coef) + jnp.sum(ent), (lp, ent)     # the entropy carries no gradient

  def full(h, hw):
    h = jnp.where(m[..., None], h, 0.0)
    logits = jnp.einsum("bse,ev->bsv", h, hw, precision=jax.lax.Precision.HIGHEST) / temperature
    logp = jax.nn.log_softmax(logits, axis=-1)
    lp = jnp.where(m, jnp.take_along_axis(logp, t[..., None], axis=-1)[..., 0], 0.0)
    ent = jax.lax.stop_gradient(jnp.where(m, -jnp.sum(jnp.exp(logp) * logp, axis=-1), 0.0))
    return jnp.sum(lp * coef) + jnp.sum(ent), (lp, ent)

  args = (jnp.asarray(hidden), jnp.asarray(head_w))
  (_, (lp, ent)), got = jax.jit(jax.value_and_grad(chunked, (0, 1), has_aux=True))(*args)
  (_, (lp_ref, ent_ref)), ref = jax.jit(jax.value_and_grad(full, (0, 1), has_aux=True))(*args)
  np.testing.assert_allclose(np.asarray(lp), np.asarray(lp_ref), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(ent), np.asarray(ent_ref), rtol=1e-5, atol=1e-5)
  assert np.all(np.asarray(lp)[~live] == 0) and np.all(np.asarray(ent)[~live] == 0)
  for g, r in zip(got, ref):
    assert np.all(np.isfinite(np.asarray(g)))
    np.testing.assert_allclose(np.asarray(g), np.nan_to_num(np.asarray(r)), rtol=0,
                               atol=1e-5 * float(np.abs(np.nan_to_num(np.asarray(r))).max()))
  assert not np.any(np.asarray(got[0])[~live])


# ------------------------------------------------------------------------------------------ on a device mesh


def test_chunks_hold_every_row_and_come_back():
  """token_chunks splits along the sequence (every row in every chunk, padded at the tail); from_chunks inverts
  it; chunk_tokens is train.loss_chunk per device times the data-parallel size of the ambient mesh."""
  x = jnp.arange(3 * 7, dtype=jnp.float32).reshape(3, 7)
  h, t, w = head.token_chunks(x[..., None], x.astype(jnp.int32), jnp.ones((3, 7)), chunk=8)
  assert h.shape == (3, 9, 1) and t.shape == w.shape == (3, 9)          # 3 chunks of 3 positions x 3 rows
  np.testing.assert_array_equal(t[0], [0, 1, 2, 7, 8, 9, 14, 15, 16])
  np.testing.assert_array_equal(w[2], [1, 0, 0, 1, 0, 0, 1, 0, 0])     # positions 6 (real), 7 and 8 (padding)
  np.testing.assert_array_equal(head.from_chunks(t, 3, 7), x)
  cfg = tiny_config(["--config.train.loss_chunk=16"])
  assert head.chunk_tokens(cfg) == 16
  with jax.set_mesh(fsdp_expert_mesh()):
    assert head.chunk_tokens(cfg) == 16 * 8                              # batch over fsdp x expert


def test_each_device_computes_its_rows_share_of_the_head():
  """8 devices, rows split over them: the compiled gradient of the cross-entropy does an eighth of the
  one-device FLOPs per device (chunks of flattened tokens lived on one or two devices each, and every device
  gathered and computed every chunk: half of the whole head per device here)."""
  mesh = fsdp_expert_mesh()
  b, s, e, v = 8, 64, 32, 512

  def cost(sharded):
    rows = P(("fsdp", "expert")) if sharded else P()
    ins = tuple(NamedSharding(mesh, p) for p in (rows, P(), rows, rows))
    f = jax.jit(jax.grad(lambda h, w, t, m: head.chunked_cross_entropy(h, w, t, m, chunk=128)[0], (0, 1)),
                in_shardings=ins)
    c = f.lower(jax.ShapeDtypeStruct((b, s, e), jnp.float32), jax.ShapeDtypeStruct((e, v), jnp.float32),
                jax.ShapeDtypeStruct((b, s), jnp.int32), jax.ShapeDtypeStruct((b, s), jnp.float32)).compile()
    ca = c.cost_analysis()
    return float((ca[0] if isinstance(ca, list) else ca)["flops"])

  one, each = cost(False), cost(True)
  assert each <= 1.2 * one / 8, (each, one)
