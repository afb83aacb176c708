"""losses/lm.py against references derived from the math (the chunked cross-entropy itself is tested in
test_losses_head.py): the MTP weights of a hand-packed batch written out by hand, the denominators, and ``lm_loss`` of the tiny model against its terms recomputed from
``model.forward``'s logits, including the gradient-accumulation identity (micro-batches with the full batch's
denominators sum to the full batch's loss).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from joyjax import model
from joyjax.losses import lm
from test_losses_head import np_cross_entropy


# ---------------------------------------------------------------------------------------- MTP weights

# Row 0: document 1 at positions 0-4, document 2 at 5-7 (continuing past the row: its last target is real);
# position 4's target would be document 2's first token, so its loss mask is 0.
# Row 1: one document at 0-5, then 2 padding positions (segment 0); position 5 has no next token.
PACKED = {
    "segment_ids": np.array([[1, 1, 1, 1, 1, 2, 2, 2],
                             [1, 1, 1, 1, 1, 1, 0, 0]], np.int32),
    "loss_mask": np.array([[1, 1, 1, 1, 0, 1, 1, 1],
                           [1, 1, 1, 1, 1, 0, 0, 0]], np.float32),
    "targets": np.array([[11, 12, 13, 14, 15, 16, 17, 18],
                         [21, 22, 23, 24, 25, 26, 0, 0]], np.int32),
}
PACKED["inputs"] = np.zeros_like(PACKED["targets"])
# Depth d: position i predicts targets[i + d + 1]; the weight is 1 when that is a real target (loss mask 1)
# of the document position i belongs to.
MTP_WEIGHTS = {
    0: [[1, 1, 1, 0, 0, 1, 1, 0],      # 3 -> target 4 (masked), 4 -> target 5 (document 2), 7 -> past the row
        [1, 1, 1, 1, 0, 0, 0, 0]],     # 4 -> target 5 (masked), 5-7 -> padding
    1: [[1, 1, 0, 0, 0, 1, 0, 0],      # 2 -> target 4 (masked), 3, 4 -> document 2, 6, 7 -> past the row
        [1, 1, 1, 0, 0, 0, 0, 0]],
    6: [[0] * 8, [0] * 8],             # 0 -> target 7 (document 2); row 1's target 6 is padding
    7: [[0] * 8, [0] * 8],             # past the row everywhere
    20: [[0] * 8, [0] * 8],
}
MTP_TARGETS = {
    0: [[12, 13, 14, 15, 16, 17, 18, 0], [22, 23, 24, 25, 26, 0, 0, 0]],
    1: [[13, 14, 15, 16, 17, 18, 0, 0], [23, 24, 25, 26, 0, 0, 0, 0]],
}


@pytest.mark.parametrize("depth", sorted(MTP_WEIGHTS))
def test_mtp_weights_of_a_packed_batch(depth):
  batch = {k: jnp.asarray(v) for k, v in PACKED.items()}
  got = np.asarray(lm.mtp_weights(batch, depth))
  np.testing.assert_array_equal(got, np.array(MTP_WEIGHTS[depth], np.float32))
  assert got.dtype == np.float32


@pytest.mark.parametrize("depth", sorted(MTP_TARGETS))
def test_mtp_targets_of_a_packed_batch(depth):
  batch = {k: jnp.asarray(v) for k, v in PACKED.items()}
  np.testing.assert_array_equal(np.asarray(lm.mtp_targets(batch, depth)), np.array(MTP_TARGETS[depth]))


def test_denominators():
  batch = {k: jnp.asarray(v) for k, v in PACKED.items()}
  cfg = tiny_config("--config.model.mtp.num_layers=2", "--config.train.mtp_loss_weight=0.3")
  d = lm.denominators(cfg, batch)
  assert float(d["tokens"]) == 12.0          # 7 + 5 live tokens
  assert float(d["sequences"]) == 2.0
  np.testing.assert_array_equal(np.asarray(d["mtp_tokens"]), [9.0, 6.0])   # sums of MTP_WEIGHTS[0] and [1]
  # no MTP loss: no MTP denominators
  for o in ("--config.train.mtp_loss_weight=0", "--config.model.mtp.num_layers=0"):
    assert lm.denominators(tiny_config(o), batch)["mtp_tokens"].shape == (0,)
  # nothing to predict: clamped to 1 (the loss is then 0, not 0/0)
  empty = dict(batch, loss_mask=jnp.zeros((2, 8), jnp.float32))
  d = lm.denominators(tiny_config("--config.model.mtp.num_layers=2"), empty)
  assert float(d["tokens"]) == 1.0 and np.asarray(d["mtp_tokens"]).tolist() == [1.0, 1.0]


# ---------------------------------------------------------------------------------- lm_loss, tiny model

# Two MTP depths (so the mean over depths is not trivially one term), a z-loss, a balance loss and a loss
# chunk that does not divide the 16 tokens of a row.
LM_OVERRIDES = ("--config.model.mtp.num_layers=2", "--config.train.z_loss=1e-3",
                "--config.train.mtp_loss_weight=0.3", "--config.train.balance_loss_alpha=1e-2",
                "--config.train.loss_chunk=12")
ROWS, SEQ = 4, 16


def _tiny_params(cfg):
  """Random parameters of the tiny model's shapes (numpy; ``model.init`` compiles slowly on the CPU)."""
  rng = np.random.default_rng(0)

  def one(path, a):
    name = jax.tree_util.keystr(path[-1:], simple=True)
    if name == "scale":
      return jnp.asarray(1 + 0.1 * rng.standard_normal(a.shape), a.dtype)
    if name == "router_bias":
      return jnp.asarray(0.01 * rng.standard_normal(a.shape), a.dtype)
    return jnp.asarray(0.1 * rng.standard_normal(a.shape), a.dtype)   # above init_std: logits of a few units

  return jax.tree_util.tree_map_with_path(one, model.abstract_params(cfg))


def _packed_batch(vocab):
  """Rows: two documents (9 + 7), one document, two documents then padding (5 + 8 + 3), one then padding."""
  docs = [[9, 7], [16], [5, 8], [12]]
  rng = np.random.default_rng(1)
  toks = rng.integers(1, vocab, (ROWS, SEQ + 1)).astype(np.int32)
  seg = np.zeros((ROWS, SEQ), np.int32)
  pos = np.zeros((ROWS, SEQ), np.int32)
  for r, lengths in enumerate(docs):
    start = 0
    for i, n in enumerate(lengths):
      seg[r, start:start + n] = i + 1
      pos[r, start:start + n] = np.arange(n)
      start += n
  # a token predicts the next one when that is in its document (or past the row, its document continuing)
  nxt = np.concatenate([seg[:, 1:], seg[:, -1:]], axis=1)
  mask = ((seg != 0) & (nxt == seg)).astype(np.float32)
  return {"inputs": toks[:, :-1], "targets": toks[:, 1:], "segment_ids": seg, "positions": pos,
          "loss_mask": mask}


def _np_mtp_weights(batch, k):
  """Position i, k tokens ahead: target i + k is live and in i's document."""
  seg, mask = batch["segment_ids"], batch["loss_mask"]
  w = np.zeros(seg.shape, np.float32)
  for r in range(seg.shape[0]):
    for i in range(seg.shape[1] - k):
      w[r, i] = float(seg[r, i] != 0 and seg[r, i + k] == seg[r, i] and mask[r, i + k] == 1)
  return w


@pytest.fixture(scope="module")
def tiny_lm():
  cfg = tiny_config(*LM_OVERRIDES)
  params = _tiny_params(cfg)
  batch = _packed_batch(cfg.model.vocab_size)
  loss_fn = jax.jit(lambda p, b, d: lm.lm_loss(cfg, p, b, d))
  return cfg, params, batch, loss_fn


def test_lm_loss_equals_its_terms_from_the_model_logits(tiny_lm):
  cfg, params, batch, loss_fn = tiny_lm
  t = cfg.train
  logits, mtp_logits, aux = jax.jit(lambda p: model.forward(
      cfg, p, batch["inputs"], positions=batch["positions"], segment_ids=batch["segment_ids"],
      return_mtp=True, return_aux=True))(params)
  assert len(mtp_logits) == 2
  ce, z, correct = np_cross_entropy(logits, batch["targets"], batch["loss_mask"])
  tokens = batch["loss_mask"].sum()
  mtp = []
  for d, ml in enumerate(mtp_logits):
    k = d + 1
    targets = np.pad(batch["targets"][:, k:], ((0, 0), (0, k)))
    w = _np_mtp_weights(batch, k)
    assert 0 < w.sum() < tokens
    mtp.append((np_cross_entropy(ml, targets, w)[0], w.sum()))
  balance = float(np.sum(np.asarray(aux["moe_layers"]["balance"], np.float64)))
  assert balance > 0
  want = (ce / tokens + t.z_loss * z / tokens + t.mtp_loss_weight * np.mean([c / n for c, n in mtp])
          + t.balance_loss_alpha * balance)

  loss, stats = loss_fn(params, batch, lm.denominators(cfg, batch))
  print(f"loss {float(loss):.6f}: ce/tokens {ce / tokens:.4f}, mtp {[c / n for c, n in mtp]}, "
        f"z {z / tokens:.3f}")
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  np.testing.assert_allclose(float(stats["ce_sum"]), ce, rtol=1e-5)
  np.testing.assert_allclose(float(stats["z_sum"]), z, rtol=1e-5)
  assert float(stats["correct_sum"]) == correct
  assert float(stats["tokens"]) == tokens
  for d, (c, _) in enumerate(mtp):
    np.testing.assert_allclose(float(stats[f"mtp{d}_ce_sum"]), c, rtol=1e-5)
  np.testing.assert_allclose(float(stats["balance_sum"]), balance * ROWS, rtol=1e-5)


def _halves(batch):
  return [{k: v[:ROWS // 2] for k, v in batch.items()}, {k: v[ROWS // 2:] for k, v in batch.items()}]


def test_micro_batches_with_the_full_denominators_sum_to_the_full_batch(tiny_lm):
  """Gradient accumulation: the two half batches, each normalised by the whole batch's denominators, give
  losses and statistics summing to the whole batch's."""
  cfg, params, batch, loss_fn = tiny_lm
  denom = lm.denominators(cfg, batch)
  halves = _halves(batch)
  full, full_stats = loss_fn(params, batch, denom)
  parts = [loss_fn(params, h, denom) for h in halves]
  np.testing.assert_allclose(sum(float(l) for l, _ in parts), float(full), rtol=1e-6)
  for key in ("ce_sum", "z_sum", "correct_sum", "tokens", "mtp0_ce_sum", "mtp1_ce_sum", "balance_sum"):
    np.testing.assert_allclose(sum(float(s[key]) for _, s in parts), float(full_stats[key]), rtol=1e-5,
                               err_msg=key)
  # Normalising each half by its own counts instead would not sum to the full loss (the halves differ).
  own = sum(float(loss_fn(params, h, lm.denominators(cfg, h))[0]) for h in halves)
  assert abs(own - 2 * float(full)) > 1e-3 * float(full)


@pytest.mark.slow  # two more compiles (the gradient at two batch shapes); the losses above sum the same way
def test_micro_batch_gradients_with_the_full_denominators_sum_to_the_full_batch(tiny_lm):
  cfg, params, batch, _ = tiny_lm
  denom = lm.denominators(cfg, batch)
  halves = _halves(batch)
  grad_fn = jax.jit(jax.grad(lambda p, b, d: lm.lm_loss(cfg, p, b, d)[0]))
  g_full = grad_fn(params, batch, denom)
  g_parts = [grad_fn(params, h, denom) for h in halves]
  for (path, a), b, c in zip(jax.tree_util.tree_flatten_with_path(g_full)[0], jax.tree.leaves(g_parts[0]),
                             jax.tree.leaves(g_parts[1])):
    a, s = np.asarray(a, np.float64), np.asarray(b, np.float64) + np.asarray(c, np.float64)
    assert np.abs(s - a).max() <= 1e-5 * max(np.abs(a).max(), 1e-6), jax.tree_util.keystr(path)
