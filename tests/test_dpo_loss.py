"""losses/dpo.py against references derived from the math.

* ``dpo_loss`` (sigmoid, label-smoothed cDPO, IPO with its length normalisation) and every metric against a
  float64 numpy computation of TRL's formulas on crafted log-probs, with a padded pair slot whose garbage values
  must not leak; micro-batch means with the whole batch's pair count add up to the batch's.
* ``chunked_token_logps`` against float64 log-softmax for chunk sizes that divide the tokens and that do not.
* ``sequence_logps`` of a hand-packed batch of the tiny model (several sequences per row, a pair split over two
  rows, padding, empty slots) against one plain ``model.forward`` per sequence, values and gradients.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from joyjax import model
from joyjax.losses import dpo, head

# ------------------------------------------------------------------------------------------- dpo_loss

# Five pairs of summed log-probs; pair 3 is an empty slot (pair_mask 0) with values that would be nan or huge.
PC = np.array([-10.0, -20.0, -7.5, 1e30, -31.0])
PR = np.array([-12.0, -18.0, -7.5, -1e30, -45.0])
RC = np.array([-11.0, -19.0, -8.0, 0.0, -30.0])
RR = np.array([-11.5, -19.5, -8.0, 0.0, -41.0])
NC = np.array([4, 10, 3, 0, 12])     # response tokens (ipo divides by these)
NR = np.array([5, 8, 3, 0, 20])
MASK = np.array([1, 1, 1, 0, 1], bool)


def np_log_sigmoid(x):
  return -np.logaddexp(0.0, -x)


def np_dpo(beta, loss_type, eps):
  """float64 TRL: per-pair losses and rewards, then means over the real pairs."""
  pc, pr, rc, rr = (a[MASK].astype(np.float64) for a in (PC, PR, RC, RR))
  if loss_type == "ipo":
    nc, nr = NC[MASK].astype(np.float64), NR[MASK].astype(np.float64)
    pc, rc, pr, rr = pc / nc, rc / nc, pr / nr, rr / nr
  h = (pc - pr) - (rc - rr)
  if loss_type == "ipo":
    losses = (h - 1 / (2 * beta)) ** 2
  else:
    losses = -(1 - eps) * np_log_sigmoid(beta * h) - eps * np_log_sigmoid(-beta * h)
  ch, rj = beta * (pc - rc), beta * (pr - rr)
  return {"loss": losses.mean(), "rewards/chosen": ch.mean(), "rewards/rejected": rj.mean(),
          "rewards/accuracy": (ch > rj).mean(), "rewards/margin": (ch - rj).mean(),
          "logps/chosen": pc.mean(), "logps/rejected": pr.mean()}


@pytest.mark.parametrize("beta,loss_type,eps", [(0.1, "sigmoid", 0.0), (0.5, "sigmoid", 0.0),
                                                (0.1, "sigmoid", 0.2), (0.1, "ipo", 0.0), (0.7, "ipo", 0.0)])
def test_dpo_loss_and_metrics_equal_float64_trl(beta, loss_type, eps):
  loss, m = dpo.dpo_loss(*(jnp.asarray(a, jnp.float32) for a in (PC, PR, RC, RR)), beta=beta, loss_type=loss_type,
                         label_smoothing=eps, pair_mask=jnp.asarray(MASK), chosen_tokens=jnp.asarray(NC),
                         rejected_tokens=jnp.asarray(NR))
  want = np_dpo(beta, loss_type, eps)
  assert set(m) == set(dpo.DPO_METRICS) | {"pairs"} and float(m["pairs"]) == 4
  assert float(loss) == float(m["loss"])
  for k, v in want.items():
    np.testing.assert_allclose(float(m[k]), v, rtol=1e-6, atol=1e-7, err_msg=k)
  assert np.all(np.isfinite([float(v) for v in m.values()]))


def test_hand_values_of_the_crafted_pairs():
  """The crafted pairs by hand: beta 0.1, sigmoid. Margins h = (pc - pr) - (rc - rr): 2 - 0.5 = 1.5,
  -2 - 0.5 = -2.5, 0 - 0 = 0, 14 - 11 = 3. Rewards chosen 0.1 * (1, -1, 0.5, -1), rejected 0.1 * (-0.5, 1.5, 0.5,
  -4): chosen > rejected for the first and the last real pair (the third ties: not counted), accuracy 2/4; the
  reward margin is beta * h, mean 0.1 * (1.5 - 2.5 + 0 + 3) / 4 = 0.05; the loss is the mean of log(1 + e^(-beta h)).
  """
  loss, m = dpo.dpo_loss(*(jnp.asarray(a, jnp.float32) for a in (PC, PR, RC, RR)), beta=0.1,
                         pair_mask=jnp.asarray(MASK))
  assert float(m["rewards/accuracy"]) == 0.5
  np.testing.assert_allclose(float(m["rewards/margin"]), 0.05, rtol=1e-6)
  want = np.mean([math.log1p(math.exp(-0.1 * h)) for h in (1.5, -2.5, 0.0, 3.0)])
  np.testing.assert_allclose(float(loss), want, rtol=1e-6)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_policy_equal_to_reference(loss_type):
  """pi == ref: h = 0, so sigmoid gives log 2 and IPO (1/(2 beta))^2; every reward is 0 and none counts."""
  x = jnp.asarray([-3.0, -9.0, -4.0])
  loss, m = dpo.dpo_loss(x, x + 1, x, x + 1, beta=0.25, loss_type=loss_type, chosen_tokens=jnp.ones(3),
                         rejected_tokens=jnp.ones(3))
  np.testing.assert_allclose(float(loss), math.log(2) if loss_type == "sigmoid" else 4.0, rtol=1e-7)
  assert float(m["rewards/chosen"]) == float(m["rewards/rejected"]) == float(m["rewards/margin"]) == 0.0
  assert float(m["rewards/accuracy"]) == 0.0


def test_micro_batch_means_with_the_full_pair_count_add_up():
  args = [jnp.asarray(a, jnp.float32) for a in (PC, PR, RC, RR)]
  _, full = dpo.dpo_loss(*args, beta=0.3, pair_mask=jnp.asarray(MASK))
  parts = []
  for sel in (np.array([1, 1, 0, 0, 0], bool), np.array([0, 0, 1, 1, 1], bool)):
    _, m = dpo.dpo_loss(*args, beta=0.3, pair_mask=jnp.asarray(MASK & sel), num_pairs=4.0)
    parts.append(m)
  for k in dpo.DPO_METRICS:
    np.testing.assert_allclose(float(parts[0][k] + parts[1][k]), float(full[k]), rtol=1e-6, err_msg=k)


def test_gradient_of_the_sigmoid_loss():
  """d/dpi_c of -log sigmoid(beta h) = -beta sigmoid(-beta h), averaged over the pairs; masked pairs get 0."""
  beta = 0.2
  g = jax.grad(lambda pc: dpo.dpo_loss(pc, *(jnp.asarray(a, jnp.float32) for a in (PR, RC, RR)), beta=beta,
                                       pair_mask=jnp.asarray(MASK))[0])(jnp.asarray(PC, jnp.float32))
  h = (PC - PR) - (RC - RR)
  want = np.where(MASK, -beta / (1 + np.exp(np.where(MASK, beta * h, 0.0))) / MASK.sum(), 0.0)
  np.testing.assert_allclose(np.asarray(g), want, rtol=1e-6, atol=1e-9)


def test_ipo_needs_lengths_and_loss_type_is_checked():
  x = jnp.zeros(2)
  with pytest.raises(ValueError, match="chosen_tokens"):
    dpo.dpo_loss(x, x, x, x, beta=0.1, loss_type="ipo")
  with pytest.raises(ValueError, match="loss_type"):
    dpo.dpo_loss(x, x, x, x, beta=0.1, loss_type="hinge")


# ------------------------------------------------------------------------------------- token log-probs


@pytest.mark.parametrize("chunk", [1, 4, 7, 21, 64])
def test_chunked_token_logps_equal_float64_log_softmax(chunk):
  rng = np.random.default_rng(0)
  hidden = rng.normal(size=(3, 7, 16)).astype(np.float32)
  head_w = (rng.normal(size=(16, 50)) / 4 * 3).astype(np.float32)
  targets = rng.integers(0, 50, (3, 7)).astype(np.int32)
  live = rng.random((3, 7)) < 0.7
  hidden[0, 0] = np.nan   # a dead token with a non-finite hidden: exactly 0, and no nan in the gradient
  live[0, 0] = False
  got = head.chunked_token_logps(jnp.asarray(hidden), jnp.asarray(head_w), jnp.asarray(targets), jnp.asarray(live),
                                chunk=chunk)
  logits = np.nan_to_num(hidden.astype(np.float64)) @ head_w.astype(np.float64)
  lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  want = np.where(live, np.take_along_axis(logits, targets[..., None], -1)[..., 0] - lse, 0.0)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
  gw = jax.grad(lambda w: jnp.sum(head.chunked_token_logps(jnp.asarray(hidden), w, jnp.asarray(targets),
                                                          jnp.asarray(live), chunk=chunk)))(jnp.asarray(head_w))
  assert np.all(np.isfinite(np.asarray(gw)))


# ------------------------------------------------------------------------------ sequence log-probs, packed

ROWS, SEQ = 2, 24


def _packed_batch(rng, pairs_per_batch):
  """Sequences (token ids, number of leading prompt tokens) packed by hand: row 0 holds sequences 1, 2 and 5
  (24 tokens, full), row 1 holds 3, 4 and 6 then 3 padding tokens: pair 2 (sequences 5 and 6) spans the rows; the
  slots of pair 3 (sequences 7, 8) are empty. Positions restart per sequence; loss_mask is 1 on response targets.
  """
  layout = [[(1, 9, 4), (2, 7, 3), (5, 8, 5)], [(3, 6, 2), (4, 10, 6), (6, 5, 1)]]  # (sequence id, length, prompt)
  seqs = {}
  batch = {k: np.zeros((ROWS, SEQ), np.int32) for k in ("inputs", "targets", "segment_ids", "positions",
                                                          "loss_mask", "sequence_ids")}
  batch["pair_index"] = np.full((ROWS, SEQ), -1, np.int32)
  for r, row in enumerate(layout):
    at = 0
    for seg, (sid, length, prompt) in enumerate(row, start=1):
      ids = rng.integers(1, 4096, length + 1).astype(np.int32)
      seqs[sid] = (ids, prompt)
      sl = slice(at, at + length)
      batch["inputs"][r, sl], batch["targets"][r, sl] = ids[:-1], ids[1:]
      batch["segment_ids"][r, sl], batch["positions"][r, sl] = seg, np.arange(length)
      batch["loss_mask"][r, sl] = (np.arange(length) >= prompt - 1) & (np.arange(length) < length)
      batch["sequence_ids"][r, sl] = sid
      batch["pair_index"][r, sl] = (sid - 1) // 2
      at += length
  assert 2 * pairs_per_batch >= 8
  return {k: jnp.asarray(v) for k, v in batch.items()}, seqs


def _plain_rows(seqs):
  """The sequences unpacked: one per row of a plain batch, in id order, padded at the END (causal attention: a
  token never sees the padding after it), with the response-target mask (target j = ids[j + 1] counts when
  j + 1 >= prompt)."""
  n = max(len(ids) for ids, _ in seqs.values())
  ids = np.zeros((len(seqs), n), np.int32)
  mask = np.zeros((len(seqs), n - 1), bool)
  for r, sid in enumerate(sorted(seqs)):
    x, prompt = seqs[sid]
    ids[r, :len(x)] = x
    mask[r, prompt - 1:len(x) - 1] = True
  return ids, mask


def test_sequence_logps_under_packing_equal_plain_forward_passes():
  """Each sequence's log-prob from the packed batch equals the float64 log-softmax of a plain forward pass's
  float32 logits (one sequence per row, no packing, no chunking) within 1e-5."""
  cfg = tiny_config({"dpo.pairs_per_batch": 4, "train.loss_chunk": 7})
  params = model.init(cfg, jax.random.key(0))
  batch, seqs = _packed_batch(np.random.default_rng(1), 4)
  got = np.asarray(jax.jit(lambda p, b: dpo.sequence_logps(cfg, p, b))(params, batch))
  assert got.shape == (8,) and got.dtype == np.float32
  ids, mask = _plain_rows(seqs)
  logits = np.asarray(jax.jit(lambda p, x: model.forward(cfg, p, x))(params, jnp.asarray(ids[:, :-1])), np.float64)
  lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  lp = np.take_along_axis(logits, ids[:, 1:, None], -1)[..., 0] - lse
  want = np.where(mask, lp, 0.0).sum(-1)
  assert np.max(np.abs(got[:6] - want)) <= 1e-5, (got[:6], want)
  assert got[6] == got[7] == 0.0   # the empty slots
  counts = np.asarray(dpo.sequence_token_counts(cfg, batch))
  np.testing.assert_array_equal(counts, [9 - 3, 7 - 2, 6 - 1, 10 - 5, 8 - 4, 5 - 0, 0, 0])
  np.testing.assert_array_equal(counts[:6], mask.sum(-1))


def test_sequence_logps_gradient_under_packing_equals_plain_gradients():
  """d/dparams of sum_k c_k logp_k from the packed batch equals that of the plain batch (one sequence per row,
  full logits, log_softmax): packing leaks nothing between sequences in the backward pass either."""
  cfg = tiny_config({"dpo.pairs_per_batch": 4, "train.loss_chunk": 7})
  params = model.init(cfg, jax.random.key(0))
  batch, seqs = _packed_batch(np.random.default_rng(1), 4)
  c = jnp.asarray([0.5, -1.0, 2.0, 0.25, -0.75, 1.5, 3.0, 3.0])   # empty slots 7, 8 weigh nothing
  got = jax.jit(jax.grad(lambda p: jnp.sum(c * dpo.sequence_logps(cfg, p, batch))))(params)

  ids, mask = (jnp.asarray(a) for a in _plain_rows(seqs))

  def plain(p):
    lp = jax.nn.log_softmax(model.forward(cfg, p, ids[:, :-1]), -1)
    lp = jnp.take_along_axis(lp, ids[:, 1:, None], -1)[..., 0]
    return jnp.sum(c[:6] * jnp.sum(jnp.where(mask, lp, 0.0), -1))

  want = jax.jit(jax.grad(plain))(params)
  flat_got, flat_want = jax.tree.leaves(got), jax.tree.leaves(want)
  scale = max(float(jnp.max(jnp.abs(w))) for w in flat_want)
  for a, b in zip(flat_got, flat_want):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5 * scale)
